"""Experiments that run a gated model (`gateskip_core.GatedModel`) and return tables or traces.

- `quality`: perplexity, KL and top-1 agreement against the original; chat fidelity;
- `sweep`: quality against compute saved for gates, ShortGPT and random skipping;
- `pruning`: pruning plus gates (`shortgpt+gateskip:K`): K layers removed, the gates skipping in the rest;
- `faithfulness`: does the gate rank tokens by what skipping them costs (exact single-skip ablations);
- `attribution`: what pushed one gate down or up;
- `logit_lens`: where a token's prediction settles across layers;
- `lens`: the TransformerLens bridge (`GatedLens`);
- `collect`: tracing a corpus into a trace file or a resumable dataset folder.
"""
