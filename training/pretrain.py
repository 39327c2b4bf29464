"""Pretrain a GPT-2 from scratch.

    python training/pretrain.py --dataset_name shakespeare --output_dir runs/shakespeare --max_train_minutes 10
    accelerate launch --num_processes 2 --cpu training/pretrain.py --dataset_name shakespeare --output_dir runs/ddp

Run with --help for every option; the loop, data preparation and evaluation live in gpt2_scratch.pretraining.
"""

from gpt2_scratch.pretraining import build_parser, run
from gpt2_scratch.training import run_script

if __name__ == "__main__":
    run_script(lambda: run(build_parser().parse_args()))
