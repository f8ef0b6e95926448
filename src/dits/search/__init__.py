"""Tree search over multi-agent conversations: tree records, batched MCTS, preference-pair mining.

Independent of the language model: the model plugs in through a :data:`Rollouter`, which continues many
conversations in one call.
"""

from dits.search.mcts import (
    OnStep,
    Rollouter,
    RolloutRequest,
    RolloutResult,
    SearchConfig,
    ValueFn,
    derive_seed,
    q_value,
    reference_candidates,
    request_seed,
    run_search,
    select_node,
    select_reference,
    select_uct,
    selection_distribution,
    tree_rng,
)
from dits.search.pairs import (
    PairConfig,
    best_and_worst,
    count_tree_pairs,
    keep_count,
    mine_pairs,
    mine_tree_pairs,
    render_pair,
)
from dits.search.textdist import edit_distance, is_near, normalized_distance
from dits.search.tree import ROOT_ID, Node, Rollout, Tree, node_order

__all__ = [
    "ROOT_ID",
    "Node",
    "OnStep",
    "PairConfig",
    "Rollout",
    "RolloutRequest",
    "RolloutResult",
    "Rollouter",
    "SearchConfig",
    "Tree",
    "ValueFn",
    "best_and_worst",
    "count_tree_pairs",
    "derive_seed",
    "edit_distance",
    "is_near",
    "keep_count",
    "mine_pairs",
    "mine_tree_pairs",
    "node_order",
    "normalized_distance",
    "q_value",
    "reference_candidates",
    "render_pair",
    "request_seed",
    "run_search",
    "select_node",
    "select_reference",
    "select_uct",
    "selection_distribution",
    "tree_rng",
]
