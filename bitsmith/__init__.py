"""bitsmith: a compiler for LLM inference (checkpoint in, quantized artifact + small runtime out)."""

import os

__version__ = "0.1.0"

# TVM's CPU thread pool defaults to half the hardware threads on x86 (it assumes SMT siblings): on a
# 2-vCPU machine that is one thread, and every kernel runs at about half speed (bench/serve.md). Use every
# CPU this process may run on, unless TVM_NUM_THREADS says otherwise; TVM reads it when its pool starts (the first parallel kernel), so this holds even if tvm is imported first.
if hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
