"""Examples shown under each subcommand's --help."""

from __future__ import annotations

EXAMPLES = {
    "train": """examples:
  mixattn train --preset small-moh --corpus shakespeare --steps 300 --out runs/moh
  mixattn train --preset tiny-moe --corpus stdlib --corpus my_notes/ --set moe.router.graph=similarity --out runs/g
  mixattn train --out runs/moh --resume                      # continue an interrupted run
  mixattn train --init runs/smol-moh --corpus shakespeare --steps 50 --lr 1e-4 --out runs/smol-moh-ct
""",
    "generate": """examples:
  mixattn generate runs/moh/checkpoint --prompt "ROMEO." --max-new-tokens 200
  mixattn generate runs/moh/checkpoint --prompt "def " --temperature 0.8 --top-k 40 --seed 1
""",
    "convert": """examples:
  mixattn convert smollm2-135m --to moa --out runs/smol-moa                 # exact: k = E = G
  mixattn convert smollm2-135m --to moa --top-k 2 --out runs/smol-moa-k2    # sparsified, then continue-train
  mixattn convert smollm2-135m --to moh --active-fraction 0.75 --out runs/smol-moh
  mixattn convert runs/branch-0/checkpoint runs/branch-1/checkpoint --to bam --attention shared-kv --out runs/bam
""",
    "export": """examples:
  mixattn export runs/smol --format llama --out hf/smol          # dense models
  mixattn export runs/jet --format jetmoe --out hf/jet           # MoA + MoE models (transformers JetMoe)
""",
    "compress": """examples:
  mixattn compress smollm2-135m --density 0.5 --out runs/plan_0.5.json
  mixattn compress smollm2-135m --density 0.25 --lengths 1024,2048,4096 --samples 4 --out plan.json  # reuses the cached profile
  mixattn compress runs/my-llama --density 0.5 --max-rules-per-layer 2 --validate-length 4096 --out plan.json
""",
    "eval": """examples:
  mixattn eval smollm2-135m --plan runs/plan_0.5.json --baseline uniform:0.5 --baseline duo:0.5 --out runs/eval
  mixattn eval smollm2-135m --plan a.json --plan b.json --tasks passkey,multikey,ppl,speed --lengths 1024,4096
""",
    "report": """examples:
  mixattn report runs/full_0.5 runs/full_0.25 --out runs/full       # two evals (one --no-dense) as one report
  mixattn report runs/full_0.5/so-far runs/full_0.25/so-far --out runs/full_now
""",
    "plan": """examples:
  mixattn plan show runs/plan_0.5.json                    # summary + heatmap PNG next to the plan
  mixattn plan baseline --kind uniform --density 0.5 smollm2-135m --out uniform.json
  mixattn plan baseline --kind duo --density 0.25 smollm2-135m --out duo.json
  mixattn plan import moa moa_alpha_beta.json --model smollm2-135m --out moa.json      # MoA (arXiv 2406.14909)
  mixattn plan import duo full_attention_heads.tsv --config config.json --sparsity 0.5 --model smollm2-135m --out duo.json
  mixattn plan export moa plan.json --model smollm2-135m --out moa_alpha_beta.json
  mixattn plan export duo plan.json --out duo/          # full_attention_heads.tsv + config.json (arXiv 2410.10819)
""",
    "demo": """examples:
  mixattn demo                       # the main job on the embedded smollm2-135m (make demo)
  mixattn demo --out runs/demo2 --densities 0.5
""",
    "compare": """examples:
  mixattn compare small small-moh small-moa --corpus shakespeare --steps 200 --out runs/compare
  mixattn compare softmax=small-moe sim=small-moe,moe.router.graph=similarity --steps 200 --out runs/routers
""",
    "presets": """examples:
  mixattn presets
""",
    "mil": """examples:
  mixattn --threads 1 mil --out runs/mil                      # ABMIL, MBA, MBA+STKIM on digit bags, 5 seeds
  mixattn mil --methods abmil,mba_stkim --seeds 3 --bag-mean 20 --target 7 --out runs/mil7
  (needs scikit-learn: pip install 'mixattn[mil]'; writes results.md, results.json and heatmap.png)
""",
}


# Training flags default to None so that a resumed run can tell a flag given again from one left out.
