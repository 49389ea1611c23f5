"""Budget allocation: per-layer candidates, exact sizes, measured sensitivities, an exact knapsack.

    from sizewise.allocate import size_table, check_budget, profile_model, allocate, render
    sizes = size_table(model, arch, cands)        # exact sizes, from shapes alone (of the packed
                                                  # artifact; layout=GGUFLayout.for_source(src): of the .gguf)
    check_budget(budget, sizes)                   # one-line error before any expensive work
    prof = profile_model(model, arch, samples, cands)
    alloc = allocate(prof, sizes, budget)         # exact multiple-choice knapsack
    print(render(alloc)); Path("plan.json").write_text(alloc.plan.to_json())

The modules, each depending only on those before it:
    candidates  Candidate, the candidate sets (GGML_FORMATS; pruning and low-rank ones: budget_candidates),
                which token tables take which
    sizes       exact file sizes: ArtifactLayout, SizeTable, size_table
    budgets     Budget, parse_budget, check_budget
    profile     the sensitivity proxy: Fisher diagonal, profile_model, token-table costs
    knapsack    solve_mckp, exact
    cache       SolvedCache: solved weights and reference log-probabilities that measuring shares
    choice      Allocation, allocate, uniform plans, plan_variants, option_variants, measure_plans, render

Loading a model, caching profiles, choosing among measured plans and compressing to a budget sit
above the allocator, in `sizewise.api.budget` (plan_for_budget, compress_to_budget, ...); the GGUF
file layout sits with the GGUF writer (`export.gguf_layout.GGUFLayout`). The allocator imports
neither the API nor the exporters.
"""

from .budgets import Budget, check_budget, parse_budget
from .cache import SolvedCache
from .candidates import GGML_FORMATS, JOINT_AXES, Candidate, JointAxes, budget_candidates, candidate_set, gguf_candidate_set
from .choice import (Allocation, allocate, kinds_line, measure_plans, option_variants, plan_variants, render,
                     uniform_allocations)
from .knapsack import Solution, solve_mckp
from .profile import (PROFILE_VERSION, LayerProfile, Profile, add_table_costs, fisher_diagonal, has_table_costs,
                      profile_model)
from .sizes import ARTIFACT, ArtifactLayout, LayerSizes, Row, SizeTable, file_layout, size_table

__all__ = ["ARTIFACT", "Allocation", "ArtifactLayout", "Budget", "Candidate", "GGML_FORMATS", "JOINT_AXES", "JointAxes",
           "LayerProfile", "budget_candidates",
           "LayerSizes", "PROFILE_VERSION", "Profile", "Row", "SizeTable", "Solution", "SolvedCache",
           "add_table_costs", "allocate", "kinds_line", "candidate_set", "check_budget", "file_layout", "fisher_diagonal",
           "gguf_candidate_set", "has_table_costs", "measure_plans", "option_variants", "parse_budget", "plan_variants",
           "profile_model", "render", "size_table", "solve_mckp", "uniform_allocations"]
