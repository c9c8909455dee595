# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install graphsearch into it (torch pinned to the 2.13.0 CPU wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT := demo-out

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,ray,hf]'
	touch $@

# A bundled CIFAR ResNet-20 on built-in synthetic data, pruned to 1/3 of its FLOPs, from
# converged weights (examples/weights/resnet20_synthetic.pt: 30 epochs on the demo's own
# training split, val 99.0%, test 98.0%, made by `python benchmarks/train_baseline.py --model
# resnet20 --epochs 30 --train synthetic:5000:10:200 --out examples/weights/resnet20_synthetic.pt`).
# The data, 10 classes each the union of 20 looks, is hard enough that the pruned model's
# loss shows (the default synthetic set is learnt to 100% by any width).
demo: install
	rm -rf $(DEMO_OUT)
	$(BIN)/graphsearch optimize examples/cifar_resnet20.py --method magnitude --flops 0.33 \
		--data synthetic:5000:10:200 --weights examples/weights/resnet20_synthetic.pt \
		--finetune-epochs 2 --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO_OUT)
