import sys; sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
import torch; torch.set_num_threads(1)
from noisy_quadratic import *
for opt,eta in [('sgd',0.5),('sgd',1.5),('adam',0.003),('adam',0.01),('adam',0.03)]:
  for p in (1.0,2.0):
    s=Setting(opt=opt,p=p,noise=1e-2,T=3000,d=200); s=replace(s,x0='ones')
    prob=Problem(s,[0,1])
    # start at x=0 to see pure noise floor of equilibrated modes... use x0 small
    sim=Sim(prob,1); sim.x=sim.x*0
    ex=[];fl=[]
    for t in range(s.T):
        sim.observe(); sim.step(torch.full((1,1),eta))
        if t>1500: ex.append(float(sim.excess().mean())); fl.append(float(sim.tau.mean())*eta/(4*(1-1/19)))
    print(opt,eta,p,'true floor',sum(ex)/len(ex),'tau-floor',sum(fl)/len(fl))
