import sys; sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
import torch; torch.set_num_threads(1)
from noisy_quadratic import *
for opt,eta,p in [('adam',0.01,1.5),('adam',0.03,1.5),('adam',0.03,2.0),('sgd',0.5,1.5),('sgd',1.5,1.5)]:
    s=Setting(opt=opt,p=p,noise=1e-2,T=4000); prob=Problem(s,[0,1,2,3]); sim=Sim(prob,1); sim.x=sim.x*0
    hs=[]; preds=[]; pred_nom=[]
    for t in range(s.T):
        l,hg=sim.observe()
        if t>2000 and hg is not None:
            hs.append(float(hg.mean()))
            if t%100==0:
                vh=sim.v[0]/(1-s.beta2**t); P=1/(vh.sqrt()+1e-8) if opt=='adam' else torch.ones_like(vh)
                kap=P*prob.h; n=0.5*prob.h*P**2*prob.sigma**2
                e=(0.5*prob.h*sim.x[0]**2)
                c=(1-0.9)/(1.1) if opt=='adam' else 1.0
                gam=(c+1-eta*kap)/(2-eta*kap)
                preds.append(float((-2*kap*(1-eta*kap)*e+2*eta*n*gam).sum(-1).mean()))
                pred_nom.append(float((-2*kap*(1-eta*kap)*e+2*eta*n).sum(-1).mean()))
        sim.step(torch.full((1,1),eta))
    print(opt,eta,p,'mean hg',sum(hs)/len(hs),'surrogate(momentum-corrected)',sum(preds)/len(preds),'surrogate(no correction)',sum(pred_nom)/len(pred_nom))
