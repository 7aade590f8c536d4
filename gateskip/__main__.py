import sys

try:
    from gateskip.cli import main
except KeyboardInterrupt:  # Ctrl-C before the runner's own handling starts
    print("gateskip: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
