"""Fine-tune a GPT-2 text classifier (sentiment on rotten_tomatoes by default).

    python training/finetune_classification.py --model_name_or_path runs/demo --output_dir runs/sentiment
    accelerate launch --num_processes 2 --cpu training/finetune_classification.py --model_name_or_path runs/demo \
        --train_file reviews.csv --text_column review --label_column stars --output_dir runs/stars --lora

Run with --help for every option; data preparation, the loop and evaluation live in gpt2_scratch.classification.
"""

from gpt2_scratch.classification import build_parser, run
from gpt2_scratch.training import run_script

if __name__ == "__main__":
    run_script(lambda: run(build_parser().parse_args()))
