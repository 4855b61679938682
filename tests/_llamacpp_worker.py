"""Runs llama.cpp (llama-cpp-python) in its own process for tests/test_gguf_llamacpp.py, so that a
llama.cpp crash (a build for instructions this CPU lacks, or a bad file) fails one test with its
signal instead of killing pytest.

    python _llamacpp_worker.py logits MODEL.gguf OUT.npy ID,ID,...     # logits of every position
    python _llamacpp_worker.py generate MODEL.gguf OUT.npy ID,ID,... N  # N greedy tokens
"""

import sys

import numpy as np


def main(mode, path, out, ids, n=None):
    import llama_cpp

    ids = [int(t) for t in ids.split(",")]
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=(mode == "logits"), verbose=False, n_threads=1,
                          seed=0)
    if mode == "logits":
        llm.eval(ids)
        result = np.array(llm.scores[: len(ids)], dtype=np.float32)
    else:
        got = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            got.append(tok)
            if len(got) == int(n):
                break
        result = np.array(got, dtype=np.int64)
    np.save(out, result)
    llm.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
