import sys, time; sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
import torch, json, numpy as np; torch.set_num_threads(1)
from noisy_quadratic import *
kwx = json.loads(sys.argv[1]) if len(sys.argv)>1 else {}
opt = sys.argv[2] if len(sys.argv)>2 else 'adam'
eps = int(sys.argv[3]) if len(sys.argv)>3 else 6
s0=Setting(opt=opt); kw=default_planner_kw(s0)
for k,v in kwx.items():
    if k=='forecast_kw': kw['forecast_kw']={**kw['forecast_kw'],**v}
    else: kw[k]=v
t=time.time()
w,st,log=pretrain(s0,eps,kw)
for l in log: print('episode p=%.2f noise=%.1e final=%.3e w=%s'%(l[0],l[1],l[2],[round(x,2) for x in l[3]]))
print('pretrain time', time.time()-t)
kw_w={**kw,'lr':1e-3}
res=[]
for p,n in SETTINGS:
    s=replace(s0,p=p,noise=n); prob=Problem(s,[0,1])
    lin,peak=tune_schedule(prob,'linear')
    r,pls=run_planner(prob, lambda j: TerminalPlanner(peak, s.T, w0=w, **kw_w))
    res.append(r/lin); print(s.name,'warm',round(r/lin,3),[round(x,2) for x in pls[0].w.tolist()],flush=True)
print('geomean', float(np.exp(np.mean(np.log(res)))))
