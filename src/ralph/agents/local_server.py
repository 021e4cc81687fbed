"""llama.cpp's own OpenAI-compatible server on a GGUF file, as a child process of Ralph's
(`python -m ralph.agents.local_server PARENT_PID --model FILE --port N ...`), through the
`xllamacpp` package (prebuilt CPU wheels of llama.cpp's server; `pip install 'ralph[local]'`).
It prints its base URL on stdout once it answers, and dies with its parent."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

from ralph.lifetime import die_with_parent


def main() -> None:
    parser = argparse.ArgumentParser(prog="ralph.agents.local_server")
    parser.add_argument("parent", type=int)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--parallel", type=int, required=True)
    parser.add_argument("--chat-template")
    args = parser.parse_args()
    die_with_parent(args.parent)

    # an optional dependency without type information
    xllamacpp: Any = importlib.import_module("xllamacpp")
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.port = args.port
    params.n_ctx = args.context
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.use_jinja = True
    if args.chat_template:
        params.chat_template = Path(args.chat_template).read_text(encoding="utf-8")
    server = xllamacpp.Server(params)
    print(f"{server.listening_address}/v1", flush=True)
    while True:  # the server runs on its own threads until this process is ended
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
