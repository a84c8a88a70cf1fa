import sys, time; sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
import torch, math, numpy as np; torch.set_num_threads(1)
from noisy_quadratic import *
from trajectory_forecast import TerminalPlanner
import json
kwx = json.loads(sys.argv[1]) if len(sys.argv)>1 else {}
opt = sys.argv[2] if len(sys.argv)>2 else 'adam'
class OracleFC:
    def __init__(self, prob, sim, j): self.prob, self.sim, self.j = prob, sim, j; self.ready=True; self.theta=torch.zeros(1); self.diag={}
    def observe(self,*a): pass
    def refit(self):
        s=self.prob.s; sim=self.sim; t=sim.t
        if s.opt=='adam':
            vh=sim.v[0,self.j]/(1-s.beta2**max(t,1)); P=1/(vh.sqrt()+1e-8)
        else: P=torch.ones(s.d)
        self.kap=P*self.prob.h; self.e=0.5*self.prob.h*sim.x[0,self.j]**2; self.n=0.5*self.prob.h*P**2*self.prob.sigma**2
        return {}
    def terminal_loss(self, eta):
        logf=torch.log((1-eta[:,None]*self.kap)**2+1e-300)
        tot=logf.sum(0); after=tot-logf.cumsum(0)
        return (self.e*torch.exp(tot)+self.n*(eta[:,None]**2*torch.exp(after)).sum(0)).sum()
res=[]
for p,n in SETTINGS:
    s=Setting(opt=opt,p=p,noise=n); prob=Problem(s,[0,1])
    lin,peak=tune_schedule(prob,'linear')
    kw=default_planner_kw(s); kw.update(kwx)
    sim=Sim(prob,1); pls=[]
    for j in range(prob.S):
        pl=TerminalPlanner(peak,s.T,**kw); pl.fc=OracleFC(prob,sim,j); pls.append(pl)
    log=[]
    for t in range(s.T):
        loss,hg=sim.observe()
        etas=torch.tensor([pl.eta(t) for pl in pls])
        for j,pl in enumerate(pls): pl.observe(t,float(etas[j]),float(loss[0,j]),None)
        log.append(float(etas[0])/peak); sim.step(etas[None])
    r=float(sim.excess().mean())/lin; res.append(r)
    print(s.name, 'oracle-forecast planner', round(r,3), 'w', [round(x,2) for x in pls[0].w.tolist()], [round(log[i],2) for i in [50,100,250,500,750,900,980]], flush=True)
print('geomean', float(np.exp(np.mean(np.log(res)))))
