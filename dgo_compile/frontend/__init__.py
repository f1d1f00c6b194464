"""Loading and tracing: a diffusers model folder, pipeline folder or bare `config.json` becomes a
`LoadedModel` (families, bounds checked before anything is allocated, channel-pruning records applied),
then a `TracedDenoiser` (torch.fx graph at a validated resolution). Also the pipeline's text encoder
for prompts.

Imports only `core`; the passes (`dgo_compile.passes`) build on this package.
"""
