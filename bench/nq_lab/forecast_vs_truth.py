import sys, os; sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
import torch, numpy as np, json; torch.set_num_threads(1)
from noisy_quadratic import *
from trajectory_forecast import TerminalPlanner
exec(open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'mc.py')).read())
kwx=json.loads(sys.argv[1]); opt=sys.argv[2]; i=int(sys.argv[3]); ts=[int(x) for x in sys.argv[4].split(',')]
p,n=SETTINGS[i]; s=Setting(opt=opt,p=p,noise=n,obs=float(os.environ.get('OBS','0.02'))); prob=Problem(s,[0])
lin,peak=tune_schedule(prob,'linear'); T=s.T
kw=default_planner_kw(s)
for k,v in kwx.items():
    if k=='forecast_kw': kw['forecast_kw']={**kw['forecast_kw'],**v}
    else: kw[k]=v
pl=TerminalPlanner(peak,T,**kw); sim=Sim(prob,1)
for t in range(T):
    loss,hg=sim.observe()
    if t in ts:
        pl.fc.refit()
        b=pl.future_b(t)
        with torch.no_grad(): plan=peak*torch.exp(pl.log_mult(b))
        e_t=float(plan[0])
        futs=[plan, plan*1.5, plan/1.5, e_t*b/b[0], plan*torch.exp(0.5*(b-b[0])), plan*torch.exp(-0.5*(b-b[0]))]
        names=['plan','x1.5','/1.5','lin-from-here','steeper','flatter']
        tru=mc_terminal(prob,sim,0,t,futs,reps=16)
        pr=torch.tensor([float(pl.fc.terminal_loss(f))-pl.fc.theta_np[0] for f in futs])
        print(f't={t} eta/peak={e_t/peak:.3f} diag', {k:round(v,4) for k,v in pl.fc.diag.items()})
        print('   true', ' '.join(f'{nm}={float(v):.3e}' for nm,v in zip(names,tru)))
        print('   pred', ' '.join(f'{nm}={float(v):.3e}' for nm,v in zip(names,pr)))
    eta=pl.eta(t)
    pl.observe(t,eta,float(loss[0,0]),float(hg[0,0]) if hg is not None else None, float(sim.tau[0,0]) if t>0 else None)
    sim.step(torch.full((1,1),eta))
print('final', float(sim.excess()[0,0])/lin)
