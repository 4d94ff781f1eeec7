#!/usr/bin/env bash
# Wheels for the GPU machine, which has torch but not these and cannot download: run here (where
# pip reaches PyPI), in the project root; gpu_check.sh installs them from .whl/ there.
#   bash benchmarks/gpu_wheels.sh        # -> .whl/ (about 12 MB; .whl/ is git-ignored)
# Versions are the ones the CPU suite runs with. deepspeed and the two fvcore dependencies are
# sdists: built here into pure-Python wheels (DS_BUILD_OPS=0: DeepSpeed's ops are not used, the
# optimizer is torch's). The machine already has numpy, pillow, pyyaml, tqdm, einops, msgpack,
# ninja, psutil, py-cpuinfo, packaging, portalocker, tabulate, cloudpickle, typing-extensions.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0 kornia==0.9.0 kornia_rs==0.2.0 \
  yacs==0.1.8 termcolor==3.3.0 submitit==1.5.4 hjson==3.1.0 pydantic==2.13.4 pydantic_core==2.46.4 \
  annotated-types==0.7.0 typing-inspection==0.4.2
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 \
  fvcore==0.1.5.post20221221 iopath==0.1.10
ls .whl
