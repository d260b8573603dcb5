"""What a run writes and reads back: the run directory (``run_dir``; the server's view with tracking and
PEFT-format adapters in ``server_run_dir``), ``summary.json`` and the console table (``summary``),
plots, tracking (TensorBoard / MLflow), export of a client's adapter, and the console's own lines
(``console``)."""
