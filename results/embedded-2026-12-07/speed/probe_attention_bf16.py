# Probe outside the project's commands: fp32 flash attention (the kernel the compiled layers call) against attention as
# explicit bf16 matmuls (bf16 scores, softmax in fp32, bf16 probabilities), forward + backward, eager, one thread, causal, 4 heads of 48.
# python results/embedded-2026-12-07/speed/probe_attention_bf16.py
import torch, time
torch.set_num_threads(1)
def flash(q,k,v):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q,k,v,0.0,True,scale=None)[0]
def math_bf16(q,k,v):
    L=q.shape[2]; s=q.shape[-1]**-0.5
    sc=(q.bfloat16()@k.bfloat16().transpose(-1,-2)).float()*s
    mask=torch.ones(L,L,dtype=torch.bool).triu(1)
    sc=sc.masked_fill(mask,float('-inf'))
    p=sc.softmax(-1)
    return (p.bfloat16()@v.bfloat16()).float()
def math_fp32(q,k,v):
    return torch.nn.functional.scaled_dot_product_attention(q,k,v,is_causal=True)
for B,L in ((2,81),(4,81),(8,81),(16,81),(16,99)):
    q,k,v=[torch.randn(B,4,L,48,requires_grad=True) for _ in range(3)]
    for name,fn in (("flash",flash),("bf16math",math_bf16)):
        for _ in range(5):
            o=fn(q,k,v); o.sum().backward()
        t0=time.perf_counter(); n=50
        for _ in range(n):
            o=fn(q,k,v); o.sum().backward()
        print(B,L,name,round(1000*(time.perf_counter()-t0)/n,3),"ms/layer")
