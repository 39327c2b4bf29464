"""Checkpoints load anywhere: Auto classes in-process, and remote code in a process that cannot import us."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch
from conftest import assert_ok, run_without_package, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from gpt2_scratch import (
    GPT2ScratchConfig,
    GPT2ScratchForCausalLM,
    GPT2ScratchForSequenceClassification,
    GPT2ScratchModel,
)


def test_import_registers_the_auto_classes():
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("gpt2_scratch"), GPT2ScratchConfig)
    assert type(AutoModel.from_config(config)) is GPT2ScratchModel
    assert type(AutoModelForCausalLM.from_config(config)) is GPT2ScratchForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is GPT2ScratchForSequenceClassification


def test_config_round_trips_and_maps_transformers_names(tmp_path):
    config = GPT2ScratchConfig.from_preset("cpu-1m", drop_rate=0.2)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (96, 4, 4)
    assert (config.max_position_embeddings, config.n_embd, config.n_positions) == (256, 96, 256)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert loaded.pop("_name_or_path") == str(tmp_path)
    assert loaded == {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_save_pretrained_writes_safetensors_code_and_auto_map(tmp_path):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    code = {"configuration_gpt2_scratch.py", "modeling_gpt2_scratch.py", "decoding_gpt2_scratch.py",
            "stock_gpt2_scratch.py"}  # the modeling file and the siblings it imports, all the code the folder needs
    assert {"config.json", "model.safetensors", *code} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    loaded = GPT2ScratchForCausalLM.from_pretrained(tmp_path)
    assert loaded.out_head.weight is loaded.transformer.tok_emb.weight  # still tied after loading
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_causal_lm_and_pipeline_load_in_a_process_without_the_package(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(tiny_config(bos_token_id=0, eos_token_id=0)).eval()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = torch.tensor([tokenizer("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        expected_logits = model(ids).logits
        expected_ids = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    torch.save({"ids": ids, "logits": expected_logits, "generated": expected_ids}, tmp_path / "expected.pt")

    result = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        folder = {str(folder)!r}
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__ == "GPT2ScratchForCausalLM", type(model)
        assert "transformers_modules" in type(model).__module__
        with torch.no_grad():
            # Recorded with 2 threads: another thread count sums in another order (2.4e-6 apart with one thread).
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
            generated = model.generate(expected["ids"], max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(generated, expected["generated"])
        generator = pipeline("text-generation", model=folder, trust_remote_code=True)
        result = generator("To be, or not to be", max_new_tokens=10, min_new_tokens=10, do_sample=False)
        text = result[0]["generated_text"]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert text == tokenizer.decode(expected["generated"][0]), text
        print("OK", text)
        """,
        cwd=tmp_path,
    )
    assert_ok(result)
    assert "OK To be, or not to be" in result.stdout


def test_sequence_classifier_loads_in_a_process_without_the_package(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(num_labels=2, id2label={0: "negative", 1: "positive"}, pad_token_id=0)
    model = GPT2ScratchForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    ids = torch.randint(1, 320, (2, 12))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    result = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForSequenceClassification
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "clf")!r}, trust_remote_code=True)
        assert model.config.id2label == {{0: "negative", 1: "positive"}}
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(expected["ids"]).logits, expected["logits"], atol=1e-6, rtol=0)
        print("OK")
        """,
        cwd=tmp_path,
    )
    assert_ok(result)


def test_causal_lm_checkpoint_starts_a_classifier(tmp_path):
    torch.manual_seed(0)
    lm = GPT2ScratchForCausalLM(tiny_config())
    lm.save_pretrained(tmp_path)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(clf) is GPT2ScratchForSequenceClassification
    assert torch.equal(clf.transformer.tok_emb.weight, lm.transformer.tok_emb.weight)


def test_a_folder_saved_by_release_0_1_loads_with_this_package(tmp_path):
    """Release 0.1.0 saved one modeling file of 1,208 lines; this package splits it in three. Its folders still load,
    through this package's classes and through their own copy of the code, with the logits and tokens it recorded."""
    with tarfile.open(Path(__file__).parent / "data" / "gpt2-scratch-0.1.0-causal-lm.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    folder = tmp_path / "gpt2-scratch-0.1.0-causal-lm"
    assert not (folder / "decoding_gpt2_scratch.py").exists()
    expected = torch.load(folder / "expected.pt")
    ours = GPT2ScratchForCausalLM.from_pretrained(folder).eval()
    own_code = get_class_from_dynamic_module("modeling_gpt2_scratch.GPT2ScratchForCausalLM", folder)
    theirs = own_code.from_pretrained(folder).eval()
    assert own_code is not GPT2ScratchForCausalLM
    for model in (ours, theirs):
        with torch.no_grad():
            # Recorded with 2 threads: another thread count sums in another order (2.4e-6 apart with one thread).
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
            generated = model.generate(expected["ids"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(generated, expected["generated"])
