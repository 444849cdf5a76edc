#!/bin/sh
# On the GPU machine, from the checkout's root, after the pieces were moved to /root/pieces:
# install the runtime, record the GPU's raw NVML answers and nvidia-smi's view, start the
# captures in the background (their own session: they outlive this command) and wait.
#   sh .gpu/go.sh SECONDS_TO_WAIT DEADLINE_S
set -u
G=$(dirname "$0")
mkdir -p /root/results
sh "$G/install.sh" /root/pieces "$G/lock.json" /root/site || exit 1
export PYTHONPATH=/root/site
python3 -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
python3 "$G/nvml_raw_dump.py" > /root/results/h200-nvml-raw.json
python3 library/nvidia_gpu_facts.py --print > /root/results/h200-capture.json
nvidia-smi -q > /root/results/h200-nvidia-smi-q.txt
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max,pcie.link.gen.current,pcie.link.width.current --format=csv > /root/results/h200-nvidia-smi-query.csv
nvidia-smi topo -m > /root/results/h200-nvidia-smi-topo-m.txt 2>&1
python3 -c "import torch; f,t=torch.cuda.mem_get_info(); print('cuda total', t, 'free', f, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" | tee /root/results/cuda-total.txt
setsid nohup python3 "$G/run_captures.py" --manifest "$G/manifest.json" --models "$G/models" --out /root/results --deadline "$2" > /root/results/campaign.log 2>&1 < /dev/null &
sh "$G/poll.sh" "$1"
