# SuperLink (server machine): Flower's own image, pinned to the Flower version the app is built on.
# It needs none of the app's dependencies: with `--isolation process` (compose.yaml) the ServerApp
# runs in the separate `superexec` image below.
FROM flwr/superlink:1.41.0
LABEL org.opencontainers.image.title="pf2lora-superlink" \
      org.opencontainers.image.description="Flower 1.41 SuperLink for the PF2LoRA app"
# The state database (registered SuperNode keys, runs) lives on a volume so it survives restarts.
RUN mkdir -p /app/data
VOLUME ["/app/data"]
ENTRYPOINT ["flower-superlink"]
CMD ["--ssl-ca-certfile", "/certs/ca.crt", "--ssl-certfile", "/certs/server.pem", "--ssl-keyfile", "/certs/server.key", "--enable-supernode-auth", "--isolation", "process", "--host", "0.0.0.0", "--port", "9093", "--database", "/app/data/state.db", "--disable-runtime-dependency-installation", "--superexec-auth-secret-file", "/secrets/superexec.secret"]
