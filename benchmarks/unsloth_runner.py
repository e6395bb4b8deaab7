"""Run unsloth-zoo's MLX DPO trainer (`unsloth_zoo.mlx.trainer.MLXDPOTrainer`), measured. Executed by the
unsloth venv's Python (`benchmarks/.peer-venv-unsloth`, made by `bench.py --setup-peer`), never imported by
poet-mlx: `PYTHON benchmarks/unsloth_runner.py '<json spec>'`.

unsloth-zoo 2026.10 installs on Linux with `--no-deps` and runs on MLX's CPU backend with
`UNSLOTH_ZOO_DISABLE_GPU_INIT=1`. Its defaults differ from poet-mlx's and mlx-lm-lora's, so the spec sets
them to the same run: float32 (its default casts to bfloat16, ~8x slower on a CPU), no 4-bit load, no
gradient accumulation, LoRA r 8 with lora_alpha = 8 x scale (its scale is alpha / r) on every linear layer
of the last `num_layers` layers, gradient checkpointing as the spec says, the same batch, lengths, beta,
learning rate and plain AdamW. It keeps its own compiled step and reference handling (LoRA scale 0 as the
reference, a second forward per step).

OpenBLAS exactly as poet-mlx's: `poet_mlx` from this checkout is imported first for its BLAS routing only
(`POET_MLX_JIT=default` and `POET_MLX_MALLOC=default` are set by the caller, so the peer gets none of
poet-mlx's other CPU settings). The result is one JSON line after RESULT_TAG; the peak memory is MLX's,
reset after the first step (its trace and compile).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "


def main() -> int:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("UNSLOTH_ZOO_DISABLE_GPU_INIT", "1")
    if spec.get("blas", True):
        import poet_mlx  # noqa: F401  (OpenBLAS before mlx.core, as in poet-mlx)
    import mlx.core as mx

    from benchmarks.report import max_rss_gb
    from unsloth_zoo.mlx.loader import FastMLXModel
    from unsloth_zoo.mlx.trainer import MLXDPOConfig, MLXDPOTrainer

    a = spec["args"]
    model, tokenizer = FastMLXModel.from_pretrained(a["model"], max_seq_length=a["max_length"], dtype="float32",
                                                   load_in_4bit=False)
    model = FastMLXModel.get_peft_model(
        model, r=a["rank"], lora_alpha=a["rank"] * a["scale"], lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        finetune_last_n_layers=a["num_layers"], use_gradient_checkpointing="mlx" if a["grad_checkpoint"] else False,
        max_seq_length=a["max_length"])
    rows = [json.loads(line) for line in Path(a["data"]).read_text().splitlines() if line.strip()]
    stamps, peaks = [], []

    class Timer:
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            peaks.append(mx.get_peak_memory() / 1e9)
            if len(stamps) == 1:
                mx.reset_peak_memory()
            return control

        def __getattr__(self, name):  # every other callback event: nothing to do
            return lambda *args, **kwargs: kwargs.get("control")

    config = MLXDPOConfig(
        per_device_train_batch_size=a["batch_size"], gradient_accumulation_steps=1, max_steps=a["steps"],
        learning_rate=a["learning_rate"], warmup_steps=0, lr_scheduler_type="constant", optim="adamw",
        weight_decay=0.0, beta=a["beta"], max_length=a["max_length"], max_prompt_length=a["max_prompt_length"],
        max_seq_length=a["max_length"], gradient_checkpointing=a["grad_checkpoint"], compile=True, logging_steps=1,
        save_steps=0, output_dir=a["output_dir"], seed=0, report_to="none", dataset_order="sequential")
    trainer = MLXDPOTrainer(model=model, tokenizer=tokenizer, train_dataset=rows, args=config, callbacks=[Timer()])
    mx.reset_peak_memory()
    tic = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - tic
    steps = [b - a_ for a_, b in zip([tic] + stamps[:-1], stamps)]
    out = {"wall_s": wall, "step_times": steps, "peak_train_gb": mx.get_peak_memory() / 1e9,
           "peak_first_step_gb": peaks[0] if peaks else None, "max_rss_gb": max_rss_gb(),
           "losses": [h.get("loss") for h in getattr(getattr(trainer, "state", None), "log_history", [])
                      if isinstance(h, dict) and "loss" in h]}
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
