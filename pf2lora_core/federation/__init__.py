"""What a federated run is made of, free of Flower: reply checks, the node directory, the round record.

The Flower strategy (``server_app.strategy``) hands these plain data (node ids, decoded metrics,
array specs) and acts on what they decide; each is unit-tested here without a Flower message.
"""
