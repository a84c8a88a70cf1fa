import sys, time; sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
import torch; torch.set_num_threads(1)
from noisy_quadratic import *
import json
kwx = json.loads(sys.argv[1]) if len(sys.argv)>1 else {}
opts = sys.argv[2].split(',') if len(sys.argv)>2 else ['sgd','adam']
nseed = int(sys.argv[3]) if len(sys.argv)>3 else 4
import os; OBS=float(os.environ.get("OBS","0.02"))
res_all=[]
for opt in opts:
  for p,n in SETTINGS:
    s=Setting(opt=opt,p=p,noise=n,obs=OBS); prob=Problem(s,list(range(nseed)))
    t=time.time()
    lin,peak=tune_schedule(prob,'linear')
    t1=time.time()-t
    kw=default_planner_kw(s)
    for k,v in kwx.items():
        if k=='forecast_kw': kw['forecast_kw']={**kw['forecast_kw'],**v}
        else: kw[k]=v
    res,pls=run_planner(prob, lambda j: TerminalPlanner(peak, s.T, **kw))
    t2=time.time()-t-t1
    ws=[[round(x,2) for x in pl.w.detach().tolist()] for pl in pls]
    res_all.append(res/lin)
    print(f'{s.name:16s} lin {lin:.3e} peak {peak:.3g} cold {res/lin:.3f} w {ws[:2]} upd {pls[0].n_updates} skip {pls[0].n_skipped} {t1:.1f}s {t2:.1f}s', flush=True)
import numpy as np
print('RESULT', ' '.join(f'{r:.3f}' for r in res_all), 'geomean %.3f max %.3f' % (float(np.exp(np.mean(np.log(res_all)))), max(res_all)))
