# Training image for megatron_midtrain on H100 clusters.
#
#   docker build -t megatron-midtrain:latest .
#   # pyxis/enroot: enroot import dockerd://megatron-midtrain:latest  -> .sqsh,
#   # then CONTAINER_IMAGE=/path/megatron-midtrain+latest.sqsh sbatch examples/slurm/train.sbatch ...
#
# Base: NVIDIA NGC PyTorch.  It ships a CUDA build of torch (NVIDIA's own
# build, version like 2.x.0a0+<sha>.nv25.xx), apex, Transformer Engine, NCCL,
# cuDNN and flash-attention on Ubuntu 24.04 with Python 3.12.  We must not
# replace that torch with a PyPI wheel, so everything the image brings for the
# GPU stack is pinned as a pip constraint before installing this package.
# Pick another release with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

# Extras of this package to install (setup.py): gpu = GPU-only deps, hf = Hugging Face I/O.
ARG PIP_EXTRAS=gpu,hf

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HYDRA_FULL_ERROR=1

# Freeze the image's GPU stack.  `pip list --format=freeze` prints name==version
# even for packages NVIDIA installed from local wheels (plain `pip freeze` would
# print file:// URLs).  NGC images may additionally set PIP_CONSTRAINT to their
# own /etc/pip/constraint.txt; pip applies both.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn[-_a-z0-9]*|nvidia[-_][-_a-z0-9]+|numpy)==' \
      > /opt/image-constraints.txt \
 && echo "pinned from base image:" && cat /opt/image-constraints.txt \
 && grep -iq '^torch==' /opt/image-constraints.txt

WORKDIR /workspace/megatron-midtrain
COPY . .

# Editable install so a checkout bind-mounted over this directory (or run from
# its own root with `python -m`) is what gets imported.  megatron-core newer
# than 0.16.1 is fine here (Python 3.12); the constraint keeps torch & co. as
# shipped.  If an extra asks for something incompatible with the image, this
# step fails loudly instead of silently downgrading the CUDA stack.
RUN pip install -c /opt/image-constraints.txt -e ".[${PIP_EXTRAS}]" \
 && pip list --format=freeze | grep -iE '^torch==' > /tmp/torch-after.txt \
 && grep -iE '^torch==' /opt/image-constraints.txt | diff - /tmp/torch-after.txt \
 && python -c "import torch, megatron.core, megatron_midtrain; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| megatron-core', megatron.core.__version__)"

# The NGC entrypoint (banner, driver checks) is kept; any command can follow, e.g.
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 IMAGE \
#       torchrun --nproc-per-node 8 -m megatron_midtrain.train experiment=...
CMD ["bash"]
