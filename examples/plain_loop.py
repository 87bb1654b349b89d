from transformers import AutoModelForCausalLM, AutoTokenizer
import l1ra
from l1ra.app.assets import smollm2_dir  # the offline model of l1ra's application

path = smollm2_dir()  # offline SmolLM2-135M-Instruct; or any hub id / local folder
tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
model = l1ra.get_l1ra_model(model, l1ra.L1RAConfig(r=8, target_modules="all-linear", update_every=2))
opt = l1ra.create_optimizer(model, lr=2e-4)  # gates get their own lr (eta_c), no weight decay
batch = tok(["Q: 2+3? A: 5", "Q: 4*2? A: 8"], return_tensors="pt", padding=True)
for step in range(3):
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    l1ra.after_optimizer_step(model, opt)  # L1 on the gates; reallocates ranks when due
    opt.zero_grad()
print(sum(l1ra.rank_pattern(model).values()), "ranks in total, budget kept")
model.save_pretrained("runs/plain-loop-adapter")  # a standard PEFT LoRA adapter
