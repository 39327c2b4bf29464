"""The gpt2-scratch explorer as a Hugging Face Space: a Gradio Space holding this file, requirements.txt and a copy of
the gpt2_scratch/ package folder (docs/explore.md says how to upload them).

The model is the Space's variable GPT2_SCRATCH_MODEL (a Hub id or a folder in the Space's repository), by default
OpenAI's GPT-2 small. Locally, `python space/app.py` serves the same page on http://127.0.0.1:7860/.
"""

import os

from gpt2_scratch.explore import LAUNCH, build_app, load_explorer

app = build_app(load_explorer(os.environ.get("GPT2_SCRATCH_MODEL", "openai-community/gpt2")))

if __name__ == "__main__":
    app.launch(**LAUNCH)
