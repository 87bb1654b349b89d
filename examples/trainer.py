from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
import l1ra
from l1ra.app.assets import smollm2_dir  # the offline model of l1ra's application

path = smollm2_dir()  # or any hub id / local folder
tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
model = l1ra.get_l1ra_model(model, l1ra.L1RAConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
ids = tok(["Q: 2+3? A: 5", "Q: 4*2? A: 8"] * 2)["input_ids"]
data = Dataset.from_dict({"input_ids": ids, "labels": ids})
args = TrainingArguments("runs/trainer-example", max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=2e-4, report_to=[], save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=data,
                  optimizers=(l1ra.create_optimizer(model, lr=args.learning_rate), None),
                  callbacks=[l1ra.L1RACallback()])  # no Trainer subclass needed
trainer.train()
model.save_pretrained("runs/trainer-example/adapter")  # loads with peft.PeftModel.from_pretrained
