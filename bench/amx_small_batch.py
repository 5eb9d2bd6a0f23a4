"""bfloat16 recurrent layers at small batches, on AMX tiles (the default where the CPU has
them) or on the AVX512-BF16 register tiles: run it twice, the second time with
SEQFUSE_CPU_CAPABILITY=avx512_bf16. Inference, 2 threads, medians of 15 calls in ms.

    .venv/bin/python bench/amx_small_batch.py
    SEQFUSE_CPU_CAPABILITY=avx512_bf16 .venv/bin/python bench/amx_small_batch.py
"""
import torch, time, statistics
torch.set_num_threads(2)
import seqfuse
from seqfuse.nn import convert
res=[]
for fam,B,T,H,bi in [("LSTM",1,64,128,False),("LSTM",8,64,256,False),("LSTM",4,32,128,True),("GRU",8,64,128,True),("LSTM",37,64,128,True)]:
    torch.manual_seed(0)
    m=convert(getattr(torch.nn,fam)(H,H,bidirectional=bi).eval()).bfloat16(); x=torch.randn(T,B,H).bfloat16()
    with torch.inference_mode():
        for _ in range(3): m(x)
        ts=[]
        for _ in range(15):
            t=time.perf_counter(); m(x); ts.append(time.perf_counter()-t)
    res.append(f"{fam} B{B} T{T} H{H} bi={bi}: {statistics.median(ts)*1e3:.3f} ms")
print(seqfuse.cpu_capability(), *res, sep="\n")
