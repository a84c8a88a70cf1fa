def mc_terminal(prob, sim, j, t, futs, reps=16):
    s=prob.s; C=len(futs); g=torch.Generator().manual_seed(99)
    x=sim.x[0,j].expand(C,reps,s.d).clone(); m=sim.m[0,j].expand(C,reps,s.d).clone(); v=sim.v[0,j].expand(C,reps,s.d).clone()
    F=torch.stack(futs)
    for i in range(F.shape[1]):
        gr=prob.h*x+prob.sigma*torch.randn(reps,s.d,generator=g)
        if s.opt=='sgd': u=gr
        else:
            k=t+i+1
            m=s.beta1*m+(1-s.beta1)*gr; v=s.beta2*v+(1-s.beta2)*gr*gr
            u=(m/(1-s.beta1**k))/((v/(1-s.beta2**k)).sqrt()+1e-8)
        x=x-F[:,i,None,None]*u
    return (0.5*prob.h*x*x).sum(-1).mean(1)
