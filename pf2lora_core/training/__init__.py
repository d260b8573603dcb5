"""What trains: adapters (peft, two levels), the dropout tape, hypergradients and the bilevel solver,
precision, cost and rank accounting, model loading, pooling, tasks and their metrics. Knows nothing of
federation: a client runs these on its own data."""
