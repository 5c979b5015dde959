"""neox-progressive: grow a family of GPT-NeoX models by progressive training.

Implements the method of Yano et al. 2025, "Efficient Construction of Model Family through
Progressive Training Using Model Expansion" (arXiv 2504.00623): train the smallest member,
grow its checkpoint with bert2BERT AKI (Chen et al. 2022, arXiv 2110.07143), train the next
member from that start, with token budgets (Eq. 4) that make the family cost what the largest
member costs from scratch.
"""

__version__ = "0.1.0"
