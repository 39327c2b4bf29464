"""Instruction-tune a GPT-2 with LoRA (generated verifiable tasks by default), then evaluate greedy answers.

    python training/finetune_instruction_lora.py --model_name_or_path runs/demo --output_dir runs/lora --merge
    accelerate launch --num_processes 2 --cpu training/finetune_instruction_lora.py \
        --model_name_or_path runs/demo --train_file alpaca.jsonl --output_dir runs/alpaca

Run with --help for every option; data preparation, the loop and evaluation live in gpt2_scratch.instruction.
"""

from gpt2_scratch.instruction import build_parser, run
from gpt2_scratch.training import run_script

if __name__ == "__main__":
    run_script(lambda: run(build_parser().parse_args()))
