"""The examples run as a user runs them: a real local swarm started by the script itself."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from swarm.client.prompts_file import load_prompts
from swarm.models.tiny import write_tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_finetune_prompt_trains_saves_and_generates_with_its_prompts(tiny_model, tmp_path):
    model = tmp_path / tiny_model.name  # the tiny Llama with a tokenizer, which the script needs
    shutil.copytree(tiny_model, model)
    write_tiny_tokenizer(model)
    saved = tmp_path / "prompts.safetensors"
    args = ["--model", str(model), "--mode", "deep_ptune", "--pre-seq-len", "4", "--steps", "2"]
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "finetune_prompt.py"),
            *args,
            "--batch-size",
            "4",
            "--save",
            str(saved),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"held-out before: loss \d", out) and re.search(r"held-out after: +loss \d", out)
    assert len(re.findall(r"^step +\d+ +loss \d", out, flags=re.M)) == 2
    assert len(re.findall(r"-> '.*' \(labelled '.*'\)$", out, flags=re.M)) == 3  # it generated, 3 times
    prompts = load_prompts(saved)
    assert prompts.tuning_mode == "deep_ptune" and prompts.pre_seq_len == 4
