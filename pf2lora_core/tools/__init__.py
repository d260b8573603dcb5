"""The console entry points: ``launch`` (``make demo``: `flwr run` with a SuperLink of its own),
``sweep`` (``pf2lora-sweep``), ``tune`` (``pf2lora-tune``) and ``synthetic`` (``pf2lora-synthetic``)."""
