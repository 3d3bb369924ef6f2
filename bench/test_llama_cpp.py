"""bench/llama_cpp.py reads what llama-bench and llama-batched-bench print: checked with
stand-in binaries that print those tools' JSON for the arguments they are given."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

import llama_cpp

FAKE_BENCH = r'''
import json, sys
a = sys.argv[1:]
get = lambda flag: a[a.index(flag) + 1]
assert get("-o") == "json" and get("-m").endswith(".gguf")
t = int(get("-t"))
info = {"n_threads": t, "build_commit": "abc", "cpu_info": "X"}
print(json.dumps([{"n_prompt": int(get("-p")), "n_gen": 0, "avg_ts": 400.0 + t, **info},
                  {"n_prompt": 0, "n_gen": int(get("-n")), "avg_ts": 100.0 + t, **info}]))
'''

FAKE_BATCHED = r'''
import json, sys
a = sys.argv[1:]
get = lambda flag: a[a.index(flag) + 1]
batches = [int(b) for b in get("-npl").split(",")]
assert get("--output-format") == "jsonl" and int(get("-c")) >= max(batches) * (int(get("-npp")) + int(get("-ntg")))
print("main: some log line")
for pl in get("-npl").split(","):
    if pl != "{skip}":
        print(json.dumps({"pl": int(pl), "pp": int(get("-npp")), "tg": int(get("-ntg")), "speed_tg": 10.0 * int(pl)}))
'''


def tool(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    bench = tool(tmp_path, "llama-bench", FAKE_BENCH)
    tool(tmp_path, "llama-batched-bench", FAKE_BATCHED.replace("{skip}", "none"))
    monkeypatch.setenv("FOURBIT_LLAMA_BENCH", str(bench))
    return tmp_path


def test_bench_reads_prompt_and_decode_rates(fakes):
    out = llama_cpp.bench(fakes / "m.gguf", threads=2, prompt=32, new_tokens=64)
    assert out == dict(prompt_tok_s=402.0, decode_tok_s=102.0, threads=2, build="abc", cpu="X")


def test_batched_bench_reads_total_decode_rate_per_batch(fakes):
    assert llama_cpp.batched_bench(fakes / "m.gguf", 2, [1, 4, 16]) == {1: 10.0, 4: 40.0, 16: 160.0}


def test_a_missing_batch_row_is_an_error(fakes):
    tool(fakes, "llama-batched-bench", FAKE_BATCHED.replace("{skip}", "4"))
    with pytest.raises(RuntimeError, match=r"no row for batch \[4\]"):
        llama_cpp.batched_bench(fakes / "m.gguf", 2, [1, 4])


def test_the_binary_is_found_or_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FOURBIT_LLAMA_BENCH", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="FOURBIT_LLAMA_BENCH=.* is not a file"):
        llama_cpp.binary()
    bench = tool(tmp_path, "llama-bench", "print('[]')")
    monkeypatch.setenv("FOURBIT_LLAMA_BENCH", str(bench))
    assert llama_cpp.binary() == bench and llama_cpp.binary("llama-batched-bench") is None
    with pytest.raises(FileNotFoundError, match="no llama-batched-bench"):
        llama_cpp.batched_bench(tmp_path / "m.gguf", 2, [1])


def test_a_failing_tool_reports_its_stderr(tmp_path, monkeypatch):
    bench = tool(tmp_path, "llama-bench", "import sys; sys.stderr.write('bad model file'); sys.exit(3)")
    monkeypatch.setenv("FOURBIT_LLAMA_BENCH", str(bench))
    with pytest.raises(RuntimeError, match="failed \\(3\\):\nbad model file"):
        llama_cpp.bench(tmp_path / "m.gguf", 2)
