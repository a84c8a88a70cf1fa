import sys, time; sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
import torch; torch.set_num_threads(1)
from noisy_quadratic import *
import json, numpy as np
kwx = json.loads(sys.argv[1]) if len(sys.argv)>1 else {}
opts = sys.argv[2].split(',') if len(sys.argv)>2 else ['adam']
which = [int(x) for x in sys.argv[3].split(',')] if len(sys.argv)>3 else [0,1,2,3]
def run_planner_log(prob, mk):
    sim = Sim(prob, 1); pls=[mk(j) for j in range(prob.S)]; log=[]
    for t in range(prob.s.T):
        loss, hg = sim.observe()
        etas = torch.tensor([pl.eta(t) for pl in pls], dtype=DT)
        for j, pl in enumerate(pls):
            pl.observe(t, float(etas[j]), float(loss[0, j]), float(hg[0, j]) if hg is not None else None, float(sim.tau[0, j]) if t > 0 else None)
        log.append(float(etas[0])); sim.step(etas[None])
    return float(sim.excess()[0].mean()), pls, log
for opt in opts:
  for i in which:
    p,n=SETTINGS[i]
    s=Setting(opt=opt,p=p,noise=n,obs=float(__import__("os").environ.get("OBS","0.02"))); prob=Problem(s,[0,1])
    lin,peak=tune_schedule(prob,'linear')
    kw=default_planner_kw(s)
    for k,v in kwx.items():
        if k=='forecast_kw': kw['forecast_kw']={**kw['forecast_kw'],**v}
        else: kw[k]=v
    res,pls,log=run_planner_log(prob, lambda j: TerminalPlanner(peak, s.T, **kw))
    fo=tune_family(prob,peak); C,k,r=fo[1]
    fam=family(s.T,torch.tensor([C]),torch.tensor([k]),torch.tensor([r]))[0]
    idx=[50,100,250,500,750,900,980]
    print(f'{s.name} planner {res/lin:.3f} family {fo[0]/lin:.3f} {fo[1]}')
    print('   t     ', idx)
    print('   planner', [round(log[i]/peak,3) for i in idx])
    print('   family ', [round(float(fam[i])/peak,3) for i in idx])
    print('   linear ', [round(1-i/s.T,3) for i in idx])
    print('   diag', {k:round(v,4) for k,v in pls[0].fc.diag.items()}, 'skips', pls[0].n_skipped)
