import torch, triton
from triton.testing import do_bench
B,H,T,D=256,6,171,64
q,k,v=[torch.randn(B,H,T,D,device="cuda",dtype=torch.float16) for _ in range(3)]
m=torch.ones(B,T,dtype=torch.bool,device="cuda")
f=torch.nn.functional.scaled_dot_product_attention
print("no mask", do_bench(lambda: f(q,k,v), return_mode="median"))
print("bool mask bcast", do_bench(lambda: f(q,k,v,attn_mask=m[:,None,None,:]), return_mode="median"))
am = torch.zeros(B,1,1,T,device="cuda",dtype=torch.float16)
print("additive bcast", do_bench(lambda: f(q,k,v,attn_mask=am), return_mode="median"))
T2=176; q2,k2,v2=[torch.randn(B,H,T2,D,device="cuda",dtype=torch.float16) for _ in range(3)]; m2=torch.ones(B,T2,dtype=torch.bool,device="cuda")
print("bool mask T176", do_bench(lambda: f(q2,k2,v2,attn_mask=m2[:,None,None,:]), return_mode="median"))
from torch.nn.attention import sdpa_kernel, SDPBackend
for be in [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]:
    try:
        with sdpa_kernel(be):
            print(be, do_bench(lambda: f(q,k,v,attn_mask=m[:,None,None,:]), return_mode="median"))
    except Exception as e: print(be, "fail", str(e)[:100])
