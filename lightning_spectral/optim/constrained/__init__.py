"""The constrained optimizers: one skeleton (:mod:`.skeleton`), nine bindings of a geometry
(:mod:`.geometry`, the constraint sets) and a direction rule: :class:`~.dual.ManifoldMuon` and
:class:`~.dual.SpectralBall`, whose directions solve a convex dual (:mod:`.directions`), in
:mod:`.dual`; the seven others, Riemannian / msign / mirror steps, in :mod:`.riemannian`.

Every step of every one of them (:class:`~.skeleton.GeometricOptimizer`: the momentum its
elementwise part, direction and retraction its whole-matrix part) is

1. momentum: ``M`` = EMA of the Euclidean gradient (``momentum=0``: the gradient itself);
2. direction: ``D`` from ``M`` at the current point ``X``, by the binding's rule;
3. retraction: ``X ← retract(X, −step·D)`` onto the constraint set,

with the set (the :mod:`~lightning_spectral.optim.constrained.geometry`) and the direction rule as follows:

=========================  ==================================  =================================  ==================
optimizer                  constraint set (per matrix)         direction                          shapes it takes
=========================  ==================================  =================================  ==================
:class:`.ManifoldMuon`     Stiefel ``WᵀW = I``                 ``msign(G + WX)``, dual ``X``      every matrix
:class:`.SpectralBall`     ``‖W‖₂ = R`` or ``≤ R``             ``msign(G + λu₁v₁ᵀ)``, dual ``λ``  every matrix
:class:`.Oblique`           unit-norm columns (or rows)         Riemannian / msign                 every matrix
:class:`.SLMuon`            ``det W = 1``                       Riemannian / msign, Lie algebra    square
:class:`.Symplectic`        ``WᵀJW = J``                        Riemannian / msign, Lie algebra    square, even size
:class:`.L1Stiefel`         Stiefel (+ an ℓ1 penalty)           Riemannian / msign                 every matrix
:class:`.BlockStiefel`      each block of rows/columns Stiefel  Riemannian / msign per block       block_size divides
:class:`.DoublyStochastic`  ``W ≥ 0``, ``W1 = 1``, ``Wᵀ1 = 1``  entropic mirror step               square, n ≥ 2
:class:`.Grassmann`         span of ``W`` (orthonormal basis)   Riemannian / msign, horizontal     non-square
=========================  ==================================  =================================  ==================

``direction="riemannian"`` is Riemannian SGD with projection transport of the momentum (as
geoopt's ``RiemannianSGD``); ``"msign"`` is ``P_T(msign(D_R))``, a Muon-sized step that is still
a descent direction, ``⟨D_R, P_T(msign(D_R))⟩ = ‖D_R‖_* ≥ 0`` (Jordan et al. 2024, Muon).

A matrix of a shape the set cannot hold is moved, when the optimizer is built, into a group of
its own right after its matrix group (``matrix=False``, named ``"<group name>_fallback"``, or
``"matrix_fallback"`` for an unnamed group) that follows the fallback rule at ``fallback_lr``,
so learning-rate schedulers reach it; ``unsupported="error"`` makes the constructor raise a
``ValueError`` naming it instead. An optimizer none of whose matrices fits its set refuses to
be built. Conv kernels are ``out × in·kh·kw`` matrices. Every matrix is projected onto its set
when the optimizer is built (unless already within
:data:`~lightning_spectral.optim.base.ON_CONSTRAINT_TOL` of it), so build the optimizer *before*
loading a checkpoint's weights.

Where the geometry takes stacks (:attr:`~lightning_spectral.optim.constrained.geometry.Geometry.batched`:
Stiefel, Grassmann, the spectral sphere/ball) same-shaped matrices of a group are stepped as one
stack (one batched direction and retraction instead of one per matrix), their state written
back per matrix as a step of each alone would leave it.

Direction and retraction run in float32 (determinants, the Cayley solve and Sinkhorn in
float64) whatever the parameter dtype; state is only tensors and plain values.
"""
