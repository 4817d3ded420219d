"""CAFE exploration on real C-MNIST at a CPU budget (results, not timings): one cell per objective,
width-16 distillation, 5 x 5 loops, evaluation width 32 x 300 epochs x 2 runs. Usage:
python benchmarks/explore_cafe.py OUT ITERATIONS LR_IMG OBJ[,OBJ...] [DATASET]"""
import json, sys, time, torch
torch.set_num_threads(1)
from fastfair import data, distill
from fastfair.evaluate import evaluate_synset
out = sys.argv[1]; its = int(sys.argv[2]); lr = float(sys.argv[3]); objs = sys.argv[4].split(",")
dsname = sys.argv[5] if len(sys.argv) > 5 else "cmnist-fg"
ds = data.load(dsname, root="../shared/data")
for obj in objs:
    cfg = distill.DistillConfig(dataset=dsname, method="cafe", objective=obj, ipc=10, iterations=its, width=16,
                                outer_loop=5, inner_loop=5, lr_img=lr, log_every=10, checkpoint_every=50)
    d = f"{out}/{dsname}_{obj}_it{its}_lr{lr:g}"
    t = time.time(); r = distill.run(cfg, ds, out_dir=d, progress=False, resume=True); dt = time.time() - t
    ev = evaluate_synset(r.images, r.labels, ds, epochs=300, runs=2, seed=0, method="cafe", progress=False,
                         net_kwargs={"width": 32})
    row = {"dataset": dsname, "objective": obj, "iterations": its, "lr_img": lr, "distill_s": round(dt, 1),
           **{k: ev[k] for k in ("acc", "deo_m", "deo_a", "acc_std", "deo_m_std")}}
    print(json.dumps(row), flush=True)
    with open(f"{out}/rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
