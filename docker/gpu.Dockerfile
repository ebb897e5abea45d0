# vlarl with GPU inference: onnxruntime-gpu (CUDA and TensorRT execution providers) and TensorRT,
# so the policy node's `providers: auto` (TensorRT > CUDA > CPU) and `vlarl export --tensorrt
# auto` use the GPU. PyPI-only path like docker/Dockerfile (ROS 2 Kilted wheels).
#   docker build -f docker/gpu.Dockerfile -t vlarl-gpu .
#   docker run --rm --gpus all vlarl-gpu .venv/bin/vlarl bringup --episodes 5
# The host needs an NVIDIA driver for CUDA 13 and the NVIDIA Container Toolkit (it mounts the
# driver). CUDA, cuDNN and TensorRT come as pip wheels, so the base image needs no CUDA install.
FROM python:3.11-slim-bookworm
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# One CUDA major for all three: PyTorch's CUDA build, onnxruntime-gpu (PyPI's wheels are built
# for CUDA 13 and cuDNN 9) and TensorRT's wheel for that CUDA major. The checks at the end
# of the build fail when their libraries do not resolve against each other.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH=torch==2.13.0+cu130
ARG ORT_GPU=onnxruntime-gpu==1.31.1
ARG TENSORRT=tensorrt-cu13==11.4.0.106
# Debian's current security updates rather than frozen versions.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libosmesa6 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vlarl
COPY requirements.txt ./
# onnxruntime-gpu replaces requirements.txt's onnxruntime: both install the same `onnxruntime`
# module, and the CPU package installed after (or beside) it would overwrite the GPU build.
RUN python3.11 -m venv .venv \
    && .venv/bin/python -m pip install --no-cache-dir -q --upgrade pip \
    && .venv/bin/python -m pip install --no-cache-dir -q --index-url "$TORCH_INDEX" "$TORCH" \
    && grep -v '^onnxruntime==' requirements.txt \
       | .venv/bin/python -m pip install --no-cache-dir -q -r /dev/stdin "$ORT_GPU" "$TENSORRT"
# The CUDA, cuDNN and TensorRT libraries live in the wheels (site-packages/nvidia/*/lib,
# tensorrt_libs); register them with the dynamic loader so ONNX Runtime's CUDA and TensorRT
# providers find them without LD_LIBRARY_PATH.
RUN .venv/bin/python -c "import glob, site; sp = site.getsitepackages()[0]; \
print('\n'.join(sorted(glob.glob(sp + '/nvidia/*/lib') + glob.glob(sp + '/tensorrt_libs'))))" \
       > /etc/ld.so.conf.d/vlarl-gpu.conf \
    && ldconfig
# Build-time checks that need no GPU: ONNX Runtime offers the CUDA and TensorRT providers, its
# CUDA provider's libraries all resolve (a CUDA-major mismatch fails here), TensorRT imports.
# The TensorRT provider's libnvinfer must match the TensorRT major ONNX Runtime was built for;
# when it does not, `providers: auto` falls back to CUDA (reported, not fatal).
RUN .venv/bin/python -c "import onnxruntime as ort, tensorrt; p = ort.get_available_providers(); \
print('providers', p, 'tensorrt', tensorrt.__version__); \
assert {'CUDAExecutionProvider', 'TensorrtExecutionProvider'} <= set(p), p" \
    && capi="$(.venv/bin/python -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')/capi" \
    && ! ldd "$capi/libonnxruntime_providers_cuda.so" | grep 'not found' \
    && { ldd "$capi/libonnxruntime_providers_tensorrt.so" | grep 'not found' \
         && echo 'warning: TensorRT provider libraries missing: auto uses CUDA' || true; }
COPY . .
# vlarl itself without resolving its dependencies again: install_requires names the CPU
# onnxruntime, which would be installed over onnxruntime-gpu.
RUN .venv/bin/python -m pip install --no-cache-dir -q --no-deps -e .
ENV ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST MUJOCO_GL=osmesa
CMD [".venv/bin/vlarl", "bringup"]
