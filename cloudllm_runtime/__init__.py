"""cloudllm's serving runtime: the model server that runs inside the container.

This package is copied verbatim into every artifact's ``code/`` folder and runs on
the container's own Python, torch and transformers (4.x in the Hugging Face DLCs).
It must never import ``cloudllm`` (the deploy-time package) and only uses APIs
that exist in both transformers 4.x and 5.x.
"""
