"""lm-eval's own command line with the `gateskip` model registered: `python -m analysis.evaluation ...`.

lm-eval 0.4.13 finds models only in its registry, which holds the models it ships; it reads no
entry points and has no option to import a module, so `lm_eval --model gateskip` cannot see ours even
after `pip install`. This runs the same command line (every lm-eval flag, unchanged) after importing
the registration, with the shipped offline tasks on the include path unless `--include_path` is given:

    python -m analysis.evaluation --model gateskip \\
        --model_args pretrained=smollm2-135m-instruct,gates=default,skip=0.2 \\
        --tasks gateskip_legal_nextsent --limit 4
"""

from __future__ import annotations

import sys

from . import SHIPPED_TASKS_DIR
from .task_loading import go_offline_if_needed


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(SHIPPED_TASKS_DIR)]
    go_offline_if_needed()  # a task whose data is not cached fails at once instead of retrying
    import lm_eval.__main__

    from . import lm  # noqa: F401  (registers "gateskip" with lm-eval)

    sys.argv = [sys.argv[0], *argv]
    lm_eval.__main__.cli_evaluate()


if __name__ == "__main__":
    main()
