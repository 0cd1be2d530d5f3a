"""scikit-learn estimators over gpubp: ``MLPClassifier`` and ``MLPRegressor``.

They take ``sklearn.neural_network``'s parameters, with its names and defaults, and set the
fitted attributes its MLPs set, so code written for scikit-learn's MLPs runs unchanged, in
pipelines, cross-validation and grid searches; ``model_`` is the trained
:class:`gpubp.Sequential`, to fine-tune, move to a GPU or save (``.onnx`` included), and
``save("m.onnx")`` writes the graph of the estimator's ``predict`` (``predict_proba`` for the
classifier), which for a Poisson regressor or a binary classifier goes on from the model's output.
Needs scikit-learn (``pip install "gpubp[sklearn]"``); ``import gpubp`` does not import it.

>>> import numpy as np
>>> from gpubp.sklearn import MLPClassifier
>>> x = np.random.default_rng(0).normal(size=(60, 4))
>>> y = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
>>> clf = MLPClassifier((16,), max_iter=1000, random_state=0, device="cpu").fit(x, y)
>>> clf.classes_.tolist(), clf.predict_proba(x).shape, clf.score(x, y) > 0.9
(['no', 'yes'], (60, 2), True)

What the estimators add: ``device``, ``backend`` and ``precision`` (as for ``Sequential``),
gpubp's activations beside scikit-learn's (``"leaky_relu"``, ``"gelu"``, ``"gelu_tanh"``,
``"silu"``; and ``"sigmoid"`` for ``"logistic"``), ``dropout`` (the fraction of each hidden
layer's outputs a :class:`gpubp.Dropout` after it drops while training; 0, the default, adds
none; the masks come from ``random_state``'s stream, see below), ``model_`` and ``save``. What
differs:

- ``solver`` is ``"adam"`` or ``"sgd"``: there is no ``"lbfgs"`` (a full-batch quasi-Newton
  method, not minibatch kernels), so no ``max_fun``. ``MLPRegressor``'s ``loss`` is
  ``"squared_error"`` or ``"poisson"``, as in scikit-learn: ``"poisson"`` trains gpubp's
  ``poisson`` loss on the log rate the linear output layer gives (scikit-learn's log link, its
  ``out_activation_`` ``"exp"``), and ``predict`` returns ``exp`` of it, the predicted mean, as
  scikit-learn's does (``model_.predict`` gives the log rates). ``y`` must be >= 0 for it: a
  negative target is an error here, where scikit-learn only documents the requirement.
- Weights start from gpubp's initialisation (He-normal for the relu family, Glorot-uniform
  otherwise, zero biases), Adam follows PyTorch's (``epsilon`` added to the bias-corrected
  root), and SGD's momentum PyTorch's form, its buffers rescaled when the rate changes
  (``invscaling``, ``adaptive``) so that the steps stay scikit-learn's.
- Input data keeps its float type where the backend computes in it (float32 stays float32,
  float64 runs in float64 on the CPU) and is float32 on a GPU; predictions come in the wider of
  the input's and the model's float types, as scikit-learn's do. Sparse input (CSR or CSC)
  stays sparse: on the CPU a batch multiplies the first layer sparse (where it stores at most
  ``numpy_backend.SPARSE_MAX_DENSITY`` of its entries), elsewhere a batch at a time is made
  dense as it trains or predicts: a TF-IDF or hashed feature matrix needs no dense copy of itself.
- The steps are scikit-learn's: along its losses (half the squared error, summed over several
  targets; the binary log loss summed over the outputs) plus ``alpha / 2 * ||W||^2`` divided
  by the batch's size, a shorter last batch's own. gpubp's own losses are means, smaller by a
  factor (``_step_scale``) that the penalty and SGD's rate are scaled by; for
  ``"poisson"`` scikit-learn's loss is half the Poisson deviance summed over the targets, whose
  gradient is gpubp's times the number of targets. ``loss_`` is scikit-learn's (the squared
  error averaged over the targets; the half deviance, which adds the constant ``y log y - y``
  that gpubp's loss leaves out): the epoch's mean loss plus the penalty, which scikit-learn
  takes before each batch's step and these at the epoch's start (the same on a full batch).
- ``sample_weight`` goes to ``Sequential.fit``, which weights each sample's loss and divides
  by the batch size (Keras's rule), after the weights are rescaled to a mean of 1 over the
  training samples; the penalty is divided by the batch's size times the mean weight, as the
  loss in the given weights is. So weights count as repeated samples, as in scikit-learn, and on
  a full batch the steps are scikit-learn's. On a minibatch, where scikit-learn divides both by
  the weight the batch holds, a step is scikit-learn's times the batch's mean weight over the
  training samples'.
- ``coefs_`` and ``intercepts_`` are copies read from ``model_``: assigning a list writes it into
  ``model_``, as scikit-learn's take one, but editing a copy in place changes nothing.
- ``sample_weight`` must be >= 0, where scikit-learn 1.9 also takes negative weights: they are
  rescaled to a mean of 1 (below), which a sum of zero or less has none of.
- ``random_state`` seeds gpubp's random stream for the estimator's own draws only (weight
  initialisation, shuffling, the early-stopping split, the Dropout masks); the library's stream
  outside is left as it was. Each call reseeds it, as scikit-learn's MLPs reseed theirs, so an
  int draws the same split and shuffle orders every call, but for the masks: ``partial_fit`` and
  a warm ``fit`` draw them on from the stream the fit that built the model left, so each call's
  are new, and the same calls on a fresh estimator draw the same ones. Fits running in parallel
  threads of one process would share that stream: run them in processes, as joblib does by
  default.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings

import numpy as np
from scipy import sparse
from scipy.special import xlogy
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

import gpubp as gb
from gpubp import _checks, _random, backends, io

# scikit-learn's estimator checks that these estimators fail, each with its reason, by class name
# and, for the Poisson regressor, "MLPRegressor(loss='poisson')"; the test suite runs every other
# check on each (tests/test_sklearn.py, at max_iter=100 as scikit-learn runs its own MLPs) and
# fails if one of these passes.
EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {
    "MLPClassifier": {},
    "MLPRegressor": {},
    "MLPRegressor(loss='poisson')": {
        "check_regressor_multioutput": "it fits make_regression's targets, negative ones among them, without the "
                                       "shift to y > 0 that the other checks make for the positive_only tag; "
                                       "loss='poisson' refuses y < 0, where scikit-learn's Poisson MLPRegressor "
                                       "trains on them and passes",
        "check_regressors_train": "it wants R^2 > 0.5 after max_iter=100 epochs of Adam at 1e-3 on targets from 1 "
                                  "to 7.5, and the log link starts every mean at exp(0) = 1: R^2 is -1.5 there "
                                  "(scikit-learn's Poisson MLPRegressor's -0.15 fails it too), 0.85 after 1000",
    },
}

# scikit-learn's activation names, and gpubp's for those scikit-learn does not have.
ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
               "sigmoid": "sigmoid", "leaky_relu": "leaky_relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh",
               "silu": "silu"}
SOLVERS = ("adam", "sgd")
LEARNING_RATES = ("constant", "invscaling", "adaptive")
# The output layer's activation -> gpubp's loss that fuses it, and scikit-learn's name for it.
# "exp" is the Poisson regressor's: a linear layer gives the log rate, which gpubp's poisson loss
# takes, and predict applies exp (scikit-learn's log link).
HEAD_LOSSES = {"softmax": "cross_entropy", "sigmoid": "binary_cross_entropy", "identity": "mse", "exp": "poisson"}
OUT_ACTIVATIONS = {"softmax": "softmax", "sigmoid": "logistic", "identity": "identity", "exp": "exp"}
HEAD_LAYERS = {"exp": "identity"}  # the output layer's gpubp activation, where it is not the head's name
REGRESSION_LOSSES = ("squared_error", "poisson")
AUTO_BATCH = 200  # batch_size="auto": min(AUTO_BATCH, n_samples), scikit-learn's rule
MIN_ADAPTIVE_RATE = 1e-6  # learning_rate="adaptive" stops once the rate is down to this


class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share; see the module documentation."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5, max_iter=200,
                 shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, n_iter_no_change=10, device="auto", backend="auto", precision="fp32", dropout=0.0):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.backend = backend
        self.precision = precision
        self.dropout = dropout

    # --------------------------------------------------------------------- fitting

    def fit(self, X, y, sample_weight=None):
        """Train on ``X`` (n_samples, n_features) and ``y`` for up to ``max_iter`` epochs; returns self.

        ``sample_weight`` (n_samples,) weights each sample's loss (see the module documentation).
        With ``warm_start=True`` training goes on from the fitted weights, under the parameters
        as they are now: the hidden layers take the current ``activation`` (the output layer's is
        the task's), the model the current ``precision``, and the Dropouts the current
        ``dropout``. Turning dropout on or off (from or to 0) builds a new ``model_`` around the
        same Dense layers, their weights and frozen flags kept; a changed rate is set in place.
        A changed ``early_stopping`` starts this fit's records of its criterion afresh
        (``validation_scores_`` and ``best_validation_score_``, or ``best_loss_``). The model's
        shape is the fitted one's: a changed ``hidden_layer_sizes``, or ``MLPRegressor``'s
        ``loss`` where it changes the output (the mean, or its log for ``"poisson"``), is a
        ValueError naming it, as a new model needs ``warm_start=False``.
        Every parameter and input is checked before anything fitted changes, and what training
        changed is put back if it raises (a loss or weights that overflow raise FloatingPointError,
        where scikit-learn raises ValueError for non-finite weights), so a call that raises leaves
        the estimator as it was, unfitted if it was. So does a call interrupted by Ctrl-C: the
        KeyboardInterrupt propagates, where scikit-learn warns and keeps the epochs trained so far.
        The ConvergenceWarning for a fit that ran all ``max_iter`` epochs comes after the fit, as
        scikit-learn's does: made an error by a warnings filter, it leaves the fit done.
        """
        return self._fit(X, y, sample_weight, incremental=False)

    def _fit(self, X, y, sample_weight, incremental: bool, classes=None):
        hidden = self._check_params()
        if incremental and self.early_stopping:
            raise ValueError("early_stopping=True: partial_fit trains one epoch on the batch it is given and holds "
                             "nothing out; use fit, or early_stopping=False")
        first = not hasattr(self, "model_") or not (self.warm_start or incremental)
        if not first:
            self._check_warm(hidden)
        # Checks come before anything fitted changes, and what training changes is put back if
        # it raises: a call that raises leaves the estimator as it was.
        X, y, features = self._validate(X, y, reset=first)
        X = X.tocsr() if sparse.issparse(X) else X  # stays sparse: Sequential.fit makes a batch dense at a time
        targets, n_outputs, labels = self._targets(y, first, classes)
        if not first and n_outputs != self.n_outputs_:
            raise ValueError(f"y: expected {self.n_outputs_} outputs per sample, as in the earlier fit, "
                             f"got {n_outputs}")
        weights = _sample_weights(sample_weight, X.shape[0])
        # scikit-learn 1.9's MLPs reseed from random_state at every fit and partial_fit call (_fit sets
        # self._random_state = check_random_state(self.random_state)): an int random_state draws the same
        # initial weights, early-stopping split and shuffle orders each call, and so does ``rng`` here.
        # They have no Dropout. Its masks come from ``rng`` on a fit that builds the model, and after
        # that from the stream that fit left (``_rng``, which each call draws on): reseeded per call,
        # every partial_fit or warm fit would draw the first call's masks again.
        seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        rng = np.random.default_rng(seed)
        masks = rng if first else self._rng
        validation = None
        if self.early_stopping and not incremental:
            train, held = self._hold_out(y, n_outputs, rng)
            validation = (X[held], y[held], None if weights is None else weights[held])
            X, targets, weights = X[train], targets[train], None if weights is None else weights[train]
        if weights is not None and not weights.mean() > 0:
            raise ValueError("sample_weight: every training sample's weight is zero, so nothing would train")
        reuses_optimizer = incremental and hasattr(self, "_optimizer")
        saved = self._snapshot(warm=not first, optimizer=reuses_optimizer)
        try:
            with _random.using(rng):
                model = self._new_model(X, n_outputs, hidden, self._head(labels)) if first else self._warm_model()
                if features is not None:
                    vars(self).pop("feature_names_in_", None)  # a fit on unnamed columns forgets the names
                    vars(self).update(features)
                if labels is not None:
                    self._label_binarizer, self.classes_ = labels, labels.classes_
                self._rng, self.model_ = masks, model
                if first:
                    self._initialize(n_outputs, hidden)
                elif self.early_stopping != (self.validation_scores_ is not None):
                    self._stopping_records()  # the criterion changed: its records start with this fit
                if not reuses_optimizer:
                    self._optimizer = self._new_optimizer(self.model_)
                    self._learning_rate = self.learning_rate_init
                stopped = self._train(X, targets, weights, validation, incremental, masks)
                # Sequential.fit checks each batch's loss, which comes before the batch's step: the
                # last step's weights are checked here, as scikit-learn checks them after training.
                if not all(np.isfinite(w).all() for w in self.model_.get_weights()):
                    raise FloatingPointError("fit: the weights became inf or NaN in training (large input values "
                                             "can do this: scale them)")
        except FloatingPointError as exc:  # Sequential.fit's says the weights are those of the last batch
            self._restore(saved)
            raise FloatingPointError(f"{str(exc).partition('; training stopped')[0]}; the estimator is left as it "
                                     "was before this call (try a lower learning_rate_init)") from None
        except BaseException:  # KeyboardInterrupt too: an interrupted call changes nothing either
            self._restore(saved)
            raise
        if not incremental and not stopped:
            what = "validation score" if validation else "training loss"
            warnings.warn(f"max_iter: all {self.max_iter} epochs ran and the {what} was still improving by more "
                          f"than tol={self.tol}; raise max_iter to train longer", ConvergenceWarning, stacklevel=3)
        return self

    def _snapshot(self, warm: bool, optimizer: bool) -> tuple:
        """What a fit or partial_fit may change, for ``_restore`` to put back if it raises: the
        attributes (references, and the contents of the lists that epochs append to); on a warm
        call (``warm``) also what training changes in place: the attributes of ``model_`` and of
        its layers (activations, dropout rates, precision, what ``Sequential.fit`` records), host
        copies of the weights, the state of the generator the Dropout masks are drawn from, and
        (``optimizer``: partial_fit steps the fitted optimizer on) the optimizer's state. A fit from
        scratch builds a new model, optimizer and generator, so copies nothing."""
        attributes = dict(vars(self))
        lists = [(value, list(value)) for value in attributes.values() if isinstance(value, list)]
        in_place = None
        if warm:
            model = self.model_
            in_place = (model, dict(vars(model)), [(layer, dict(vars(layer))) for layer in model],
                        model.get_weights(), self._rng.bit_generator.state,
                        self._optimizer.state_dict() if optimizer else None)
        return attributes, lists, in_place

    def _restore(self, saved: tuple) -> None:
        """Put the estimator back as ``_snapshot`` found it."""
        attributes, lists, in_place = saved
        for value, contents in lists:
            value[:] = contents
        if in_place is not None:
            model, model_attributes, layers, weights, masks_state, optimizer_state = in_place
            vars(model).clear()
            vars(model).update(model_attributes)
            for layer, layer_attributes in layers:
                vars(layer).clear()
                vars(layer).update(layer_attributes)
            for param, host in zip(model.parameters(), weights):
                param.data = param.backend.asarray(host, host.dtype)
            attributes["_rng"].bit_generator.state = masks_state
            if optimizer_state is not None:
                attributes["_optimizer"].load_state_dict(optimizer_state)
        vars(self).clear()
        vars(self).update(attributes)

    def _check_params(self) -> list[int]:
        """Check every parameter, naming it in the error; returns the hidden layer sizes."""
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral):
            sizes = [sizes]
        if isinstance(sizes, str) or not hasattr(sizes, "__iter__"):
            raise TypeError(f"hidden_layer_sizes: expected an int or a sequence of ints, got {sizes!r}")
        hidden = [_checks.positive_int(size, f"hidden_layer_sizes[{i}]") for i, size in enumerate(sizes)]
        _choice(self.activation, tuple(ACTIVATIONS), "activation")
        try:
            gb.Dropout(self.dropout)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"dropout: {str(exc).removeprefix('rate: ')}") from None
        if self.solver == "lbfgs":
            raise ValueError("solver: 'lbfgs' is a full-batch quasi-Newton method, which gpubp does not offer; "
                             f"expected one of {SOLVERS}")
        _choice(self.solver, SOLVERS, "solver")
        _choice(self.learning_rate, LEARNING_RATES, "learning_rate")
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            _checks.positive_int(self.batch_size, "batch_size")
        _checks.positive_int(self.max_iter, "max_iter")
        if self.n_iter_no_change != np.inf:
            _checks.positive_int(self.n_iter_no_change, "n_iter_no_change")
        for name in ("alpha", "power_t", "tol"):
            _checks.non_negative(getattr(self, name), name)
        for name in ("learning_rate_init", "epsilon"):
            _checks.positive(getattr(self, name), name)
        for name in ("momentum", "beta_1", "beta_2", "validation_fraction"):
            _checks.in_unit_interval(getattr(self, name), name, closed=name == "momentum")  # scikit-learn's ranges
        for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
            _checks.boolean(getattr(self, name), name)
        try:
            check_random_state(self.random_state)
        except ValueError:  # scikit-learn's own message names neither the parameter nor what it takes
            raise ValueError(f"random_state: expected None, an int in [0, 2**32 - 1] or a numpy.random.RandomState, "
                             f"got {self.random_state!r}") from None
        # scikit-learn's rule: a flag, or a level >= 0 (any level above 0 prints the same here)
        if not isinstance(self.verbose, (bool, np.bool_, numbers.Integral)):
            raise TypeError(f"verbose: expected True, False or an int >= 0, got {type(self.verbose).__name__} "
                            f"{self.verbose!r}")
        if self.verbose < 0:
            raise ValueError(f"verbose: expected True, False or an int >= 0, got {self.verbose}")
        return hidden

    def _check_warm(self, hidden: list[int]) -> None:
        """Refuse, naming it, a parameter that a warm fit or partial_fit cannot apply to the fitted
        model, whose layers it trains on: a ``device`` and ``backend`` that pick another backend than
        its, or ``hidden`` (the hidden layer sizes) other than its. Sets nothing."""
        backend = backends.resolve(self.device, self.backend)
        if backend != self.model_.backend_name:
            raise ValueError(f"device={self.device!r}, backend={self.backend!r}: the {backend!r} backend, but the fitted "
                             f"model runs on the {self.model_.backend_name!r} one; a warm fit or partial_fit trains "
                             "the fitted model where it is: fit with warm_start=False for a new model")
        fitted = [layer.out_features for layer in self.model_ if isinstance(layer, gb.Dense)][:-1]
        if hidden != fitted:
            raise ValueError(f"hidden_layer_sizes: {self.hidden_layer_sizes!r}, but the fitted model's hidden layers "
                             f"are {tuple(fitted)}; a warm fit or partial_fit trains the fitted model on: fit with "
                             "warm_start=False for a new model")

    def _new_model(self, X, n_outputs: int, hidden: list[int], head: str) -> gb.Sequential:
        """A freshly initialised model for ``X`` (its width and float type): the ``hidden`` layers,
        then ``n_outputs`` outputs for the output activation ``head``."""
        backend = backends.resolve(self.device, self.backend)
        dtype = X.dtype if X.dtype in backends.get(backend).DTYPES else np.dtype(np.float32)
        sizes = [X.shape[1], *hidden]
        layers = [gb.Dense(fan_in, fan_out, ACTIVATIONS[self.activation], dtype=dtype)
                  for fan_in, fan_out in zip(sizes, sizes[1:])]
        output = gb.Dense(sizes[-1], n_outputs, HEAD_LAYERS.get(head, head), dtype=dtype)
        return gb.Sequential(self._with_dropout(layers, output), backend=backend, dtype=dtype,
                             precision=self.precision)

    def _with_dropout(self, hidden: list[gb.Dense], output: gb.Dense) -> list[gb.Layer]:
        """The hidden layers, each followed by a Dropout of rate ``dropout`` unless it is 0, then the output layer."""
        layers = []
        for layer in hidden:
            layers += [layer, gb.Dropout(self.dropout)] if self.dropout else [layer]
        return [*layers, output]

    def _warm_model(self) -> gb.Sequential:
        """``model_`` under the current ``activation``, ``dropout`` and ``precision``, for a warm
        fit or partial_fit (see ``fit``). What can raise (a precision or a layout this device
        cannot run) comes first, before any layer changes."""
        model = self.model_
        dense = [layer for layer in model if isinstance(layer, gb.Dense)]
        if any(isinstance(layer, gb.Dropout) for layer in model) != bool(self.dropout and dense[:-1]):
            # The same Dense layers: their weights, frozen flags and (partial_fit's) optimizer state go on.
            model = gb.Sequential(self._with_dropout(dense[:-1], dense[-1]), backend=model.backend_name,
                                  dtype=model.dtype, fused=model.fused, precision=self.precision)
        else:
            model.precision = self.precision
        for layer in dense[:-1]:
            layer.activation = ACTIVATIONS[self.activation]
        for layer in model:
            if isinstance(layer, gb.Dropout):
                layer.rate = float(self.dropout)
        return model

    def _initialize(self, n_outputs: int, hidden: list[int]) -> None:
        """Fresh training records, as a first fit starts."""
        self.n_outputs_ = n_outputs
        self.n_layers_ = len(hidden) + 2
        self.out_activation_ = OUT_ACTIVATIONS[self._head()]
        self.t_ = 0
        self.loss_curve_ = []
        self._stopping_records()

    def _stopping_records(self) -> None:
        """Fresh records of the stopping criterion ``early_stopping`` picks: the validation scores,
        or the best training loss (scikit-learn's attributes, None for the other criterion's)."""
        self._no_improvement_count = 0
        self._best_weights = None  # the weights of best_validation_score_, kept across warm fits
        if self.early_stopping:
            self.validation_scores_, self.best_validation_score_, self.best_loss_ = [], -np.inf, None
        else:
            self.validation_scores_, self.best_validation_score_, self.best_loss_ = None, None, np.inf

    def _new_optimizer(self, model: gb.Sequential, solver: str | None = None):
        """Adam or SGD (``solver``, by default the ``solver`` parameter's) over two param groups:
        the weights, which alpha's penalty decays, and the biases."""
        weights = [p for p in model.parameters() if p.name == "weight"]
        biases = [p for p in model.parameters() if p.name == "bias"]
        groups = [{"params": weights}, {"params": biases}]
        if (self.solver if solver is None else solver) == "adam":
            return gb.optim.Adam(groups, lr=self.learning_rate_init, betas=(self.beta_1, self.beta_2), eps=self.epsilon)
        return gb.optim.SGD(groups, lr=self.learning_rate_init, momentum=self.momentum,
                            nesterov=bool(self.nesterovs_momentum and self.momentum > 0))

    def _loss_scale(self) -> float:
        """scikit-learn's loss over gpubp's: the same for softmax, the binary log loss summed over
        the outputs where gpubp's averages it, half the squared error for regression, and the
        half Poisson deviance summed over the outputs (less its constant, ``_loss_offset``)."""
        return {"softmax": 1.0, "sigmoid": float(self.n_outputs_), "identity": 0.5,
                "exp": float(self.n_outputs_)}[self._head()]

    def _step_scale(self) -> float:
        """scikit-learn's loss gradient over gpubp's. As the loss, but for several regression
        targets: scikit-learn reports the squared error averaged over them and steps along its sum."""
        return self._loss_scale() * (self.n_outputs_ if self._head() == "identity" else 1)

    def _train(self, X, targets, weights, validation, incremental: bool, masks: np.random.Generator) -> bool:
        """One epoch (partial_fit) or up to max_iter epochs of ``Sequential.fit`` on the training
        rows, with scikit-learn's bookkeeping after each epoch; ``weights``: None, or weights that
        are not all zero; ``validation``: (X, y, sample_weight) held out for early stopping, or None;
        ``masks``: the generator the Dropout masks are drawn from, the shuffle orders coming from
        the library's stream, which ``_fit`` has set to the call's own. True when the stopping
        criterion stopped it."""
        n_samples = X.shape[0]  # a sparse matrix has no len()
        batch = self._batch_size(n_samples)
        weighting, mean_weight = {}, 1.0
        if weights is not None:
            mean_weight = weights.mean()
            weighting["sample_weight"] = weights / mean_weight
        self._loss_offset = self._constant_loss(targets, weights)
        self.n_iter_ = 0
        # scikit-learn divides the penalty by the weight a batch holds, as if weights were repeated
        # samples; here by what the weighted loss is divided by, the batch's size times the mean
        # weight (a short last batch's own size): _Epochs sets it before each batch.
        epochs = _Epochs(self, n_samples, batch, self.alpha / (self._step_scale() * mean_weight),
                         -(-n_samples // batch) / (n_samples * mean_weight), validation, _random.generator(), masks)
        self.model_.fit(X, targets, loss=HEAD_LOSSES[self._head()], optimizer=self._optimizer,
                        epochs=1 if incremental else self.max_iter, batch_size=batch, shuffle=bool(self.shuffle),
                        callbacks=[epochs], verbose=0, learning_rate=self._gpubp_rate(), **weighting)
        # The best validation score's weights, of this fit or, on a warm one that never beat it, of
        # the fit that set it, as scikit-learn keeps its _best_coefs (None without early stopping).
        if self._best_weights is not None:
            self.model_.set_weights(self._best_weights)
        return epochs.stopped

    def _validate(self, X, y, reset: bool):
        """(X, y, the feature attributes a fit from scratch learns, or None), as ``validate_data``
        checks them. ``reset``: a fit from scratch, which validates on an unfitted clone, so that
        this estimator's ``n_features_in_`` and ``feature_names_in_`` change only once every
        other check has passed too."""
        checker = clone(self) if reset else self
        X, y = validate_data(checker, X, y, accept_sparse=("csr", "csc"), multi_output=True,
                             y_numeric=not is_classifier(self), dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not reset:
            return X, y, None
        return X, y, {name: getattr(checker, name) for name in ("n_features_in_", "feature_names_in_")
                      if hasattr(checker, name)}

    def _hold_out(self, y, n_outputs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, validation rows) for early stopping, stratified where scikit-learn
        stratifies: for a classifier with ``n_outputs`` 1 (binary classes), not for several
        classes or labels. ``rng`` draws the split's seed."""
        n_held = math.ceil(self.validation_fraction * len(y))  # train_test_split's rounding
        if n_held < 2:
            raise ValueError(f"validation_fraction: {self.validation_fraction} of {len(y)} samples holds out "
                             f"{n_held}, too few to score; raise it, or give more data")
        stratify = y if is_classifier(self) and n_outputs == 1 else None
        try:
            return train_test_split(np.arange(len(y)), test_size=n_held,
                                    random_state=int(rng.integers(np.iinfo(np.int32).max)), stratify=stratify)
        except ValueError as exc:  # train_test_split's names its own arguments: a class too small, an empty set
            split = " stratified by class" if stratify is not None else ""
            raise ValueError(f"early_stopping=True, validation_fraction={self.validation_fraction}: holding out "
                             f"{n_held} of {len(y)} samples{split} fails: {exc}") from None

    def _constant_loss(self, targets, weights) -> float:
        """What scikit-learn's loss adds to gpubp's scaled one on these targets: 0 but for the
        Poisson deviance's ``y log y - y`` summed over the outputs, averaged over the samples."""
        return 0.0

    def _batch_size(self, n_samples: int) -> int:
        if isinstance(self.batch_size, str):
            return min(AUTO_BATCH, n_samples)
        if self.batch_size > n_samples:
            warnings.warn(f"batch_size: {self.batch_size} is more than the {n_samples} training samples; "
                          f"using {n_samples}", stacklevel=5)  # the caller of fit or partial_fit
        return min(self.batch_size, n_samples)

    @property
    def _solver(self) -> str:
        """The solver of the optimizer held, which partial_fit steps on, as scikit-learn's does: a
        ``solver`` changed by set_params applies from the next call that builds an optimizer."""
        return "adam" if isinstance(self._optimizer, gb.optim.Adam) else "sgd"

    def _gpubp_rate(self) -> float:
        """The optimizer's rate for scikit-learn's current one: SGD's steps scale with the loss."""
        return self._learning_rate * (self._step_scale() if self._solver == "sgd" else 1.0)

    def _squared_weights(self) -> float:
        """``||W||^2`` summed over the layers: what alpha's penalty multiplies."""
        return sum(p.backend.sumsq(p.data) for p in self.model_.parameters() if p.name == "weight")

    def _end_epoch(self, data_loss: float, squares: float, n_samples: int, penalty_share: float, validation) -> bool:
        """scikit-learn's records after an epoch of ``n_samples`` that began with ``_squared_weights()
        == squares``; ``penalty_share``: the number of batches over the weight they hold. True to stop."""
        self.n_iter_ += 1
        self.t_ += n_samples
        self.loss_ = float(self._loss_scale() * data_loss + self._loss_offset
                           + 0.5 * self.alpha * squares * penalty_share)
        self.loss_curve_.append(self.loss_)
        if self.verbose:
            print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
        if validation is not None:
            score = self._score_arrays(*validation)
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            # A NaN score (a prediction that is not finite) counts as no improvement; scikit-learn's
            # test, ``score < best + tol`` for none, counts it as one, so a NaN run would never stop.
            improved = score >= self.best_validation_score_ + self.tol
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_weights = self.model_.get_weights()
        else:
            improved = self.loss_ <= self.best_loss_ - self.tol
            self.best_loss_ = min(self.best_loss_, self.loss_)
        self._no_improvement_count = 0 if improved else self._no_improvement_count + 1
        if self._solver == "sgd" and self.learning_rate == "invscaling":
            self._set_rate(self.learning_rate_init / (self.t_ + 1) ** self.power_t)
        if self._no_improvement_count <= self.n_iter_no_change:
            return False
        message = (f"{'Validation score' if validation else 'Training loss'} did not improve by more than "
                   f"tol={self.tol} for {self.n_iter_no_change} consecutive epochs.")
        if self._solver == "sgd" and self.learning_rate == "adaptive" and self._learning_rate > MIN_ADAPTIVE_RATE:
            self._set_rate(self._learning_rate / 5)
            self._no_improvement_count = 0
            if self.verbose:
                print(f"{message} Learning rate divided by 5, to {self._learning_rate:g}.")
            return False
        if self.verbose:
            print(f"{message} Stopping.")
        return True

    def _set_rate(self, rate: float) -> None:
        """Change scikit-learn's rate. SGD's momentum buffers are rescaled so the next step is
        scikit-learn's: its velocity holds past steps already times their rates (``v = m v -
        lr g``, the step ``v``), where PyTorch's buffer holds gradients that the current rate
        multiplies (``b = m b + g``, the step ``-lr b``); the two agree while ``v = -lr b``, so a
        rate going from ``lr`` to ``lr'`` multiplies ``b`` by ``lr / lr'``."""
        before = self._gpubp_rate()
        self._learning_rate = rate
        after = self._gpubp_rate()
        for group in self._optimizer.param_groups:
            group["lr"] = after
        if self._solver != "sgd" or not self.momentum or after == before:
            return
        for param in self.model_.parameters():
            velocity = self._optimizer.state.get(param, {}).get("velocity")
            if velocity is not None:
                param.backend.scale_(velocity, before / after)

    # --------------------------------------------------------------------- predicting

    def _outputs(self, X) -> np.ndarray:
        """The model's outputs for ``X`` (n_samples, n_outputs_): probabilities for a classifier."""
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=("csr", "csc"), dtype=(np.float64, np.float32), reset=False)
        return self._predict_arrays(X)

    def _predict_arrays(self, X) -> np.ndarray:
        # In X's float type where that is wider than the model's, as scikit-learn's MLPs predict
        # float64 for float64 input (a float32 model's outputs are exact in float64).
        outputs = self.model_.predict(X)  # a sparse X a batch at a time
        return outputs.astype(np.result_type(X.dtype, outputs.dtype), copy=False)

    @property
    def coefs_(self) -> list[np.ndarray]:
        """Each layer's weight matrix (in, out), scikit-learn's layout: copies read from ``model_``.
        Assigning a list of them writes them into ``model_`` (editing a copy in place changes nothing)."""
        return self._read_parameters("weight")

    @coefs_.setter
    def coefs_(self, values) -> None:
        self._write_parameters("weight", "coefs_", values)

    @property
    def intercepts_(self) -> list[np.ndarray]:
        """Each layer's bias vector (out,): copies read from ``model_``; assigning a list writes them."""
        return self._read_parameters("bias")

    @intercepts_.setter
    def intercepts_(self, values) -> None:
        self._write_parameters("bias", "intercepts_", values)

    def _read_parameters(self, kind: str) -> list[np.ndarray]:
        check_is_fitted(self)
        return [p.backend.to_host(p.data).copy() for p in self.model_.parameters() if p.name == kind]

    def _write_parameters(self, kind: str, name: str, values) -> None:
        """``values`` (one array per layer) as ``model_``'s parameters of ``kind``, as scikit-learn's
        MLPs take an assigned ``coefs_`` or ``intercepts_``: every array is checked (shape, finite
        numbers in the model's float type) before any weight changes."""
        check_is_fitted(self)
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"{name}: expected a list of arrays, one per layer, got {type(values).__name__}")
        params = self.model_.parameters()
        slots = [i for i, p in enumerate(params) if p.name == kind]
        if len(values) != len(slots):
            raise ValueError(f"{name}: expected {len(slots)} arrays, one per layer, got {len(values)}")
        weights = self.model_.get_weights()
        for layer, (slot, value) in enumerate(zip(slots, values)):
            weights[slot] = _checks.weight_values(value, tuple(params[slot].shape), self.model_.dtype,
                                                  f"{name}[{layer}]", f"layer {layer}'s {kind}", "the model")
        self.model_.set_weights(weights)

    def save(self, path) -> None:
        """Write to ``path``, which must end in ``.onnx``, the inference graph of what ``predict``
        computes (``MLPRegressor``) or ``predict_proba`` (``MLPClassifier``), atomically: ``model_``'s
        graph (see :mod:`gpubp.onnx`), then ``exp`` of a Poisson regressor's log mean, or ``1 - p``
        before a binary classifier's ``p``. Its input is ``"input"``, (batch, n_features_in_) in the
        model's float type; its output ``"output"``, (batch, n_outputs_) for a regressor (a single
        target's as a column, which ``predict`` ravels) and (batch, n_classes) for a classifier.
        ``gb.load`` does not read it back (its last steps are no layer); ``model_.save`` writes the
        model alone, to ``.onnx`` or gpubp's own formats, and the estimator itself pickles."""
        check_is_fitted(self)
        if io._path(path).suffix.lower() != ".onnx":
            raise ValueError(f"path: an estimator saves its inference graph, to a file ending in .onnx, got "
                             f"{str(path)!r}; pickle the estimator (joblib.dump) to keep all of it, or save model_ "
                             "to gpubp's formats")
        io.save(self, path)  # gpubp.onnx.model_proto writes an estimator's predict graph

    def _onnx_output(self) -> str | None:
        """What ``gpubp.onnx.model_proto`` writes after ``model_``'s graph so that it computes
        ``predict`` (a regressor) or ``predict_proba`` (a classifier): a key of its
        ``ESTIMATOR_OUTPUTS``, or None for nothing."""
        check_is_fitted(self)
        return None

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    # --------------------------------------------------------------------- pickling

    def __getstate__(self) -> dict:
        """The model as gpubp's file contents (no backend objects) and the backend it ran on, the
        optimizer as its solver and state dict: what was fitted, whatever set_params has changed since."""
        state = dict(super().__getstate__())  # object.__getstate__ gives __dict__ itself, not a copy
        if "model_" in state:
            state["model_"] = (*io.model_contents(self.model_), self.model_.backend_name)
            state["_optimizer"] = (self._solver, self._optimizer.state_dict())
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "model_" in state:
            header, tensors, *fitted_on = state["model_"]  # older pickles hold no backend
            backend = fitted_on[0] if fitted_on else backends.resolve(self.device, self.backend)
            try:
                backends.get(backend)
            except RuntimeError as exc:  # a GPU's estimator unpickled on a machine without one
                warnings.warn(f"the pickled {type(self).__name__} was fitted on the {backend!r} backend, which does "
                              f"not run here ({exc}); its model runs on the backend device='auto' picks",
                              RuntimeWarning, stacklevel=2)
                backend = "auto"
            self.model_ = io.model_from(f"a pickled {type(self).__name__}", header, tensors, backend=backend)
            optimizer_state = state["_optimizer"]
            solver, optimizer_state = (optimizer_state if isinstance(optimizer_state, tuple)  # older: the state alone
                                       else ("adam" if "betas" in optimizer_state["param_groups"][0] else "sgd",
                                             optimizer_state))
            self._optimizer = self._new_optimizer(self.model_, solver)
            # Copies: the optimizer updates its state in place, and unpickled arrays may be read-only.
            self._optimizer.load_state_dict(copy.deepcopy(optimizer_state))


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multilayer perceptron classifier: scikit-learn's ``MLPClassifier`` on gpubp's kernels.

    Binary targets train one sigmoid output, more classes a softmax over one output each,
    and a multi-label indicator matrix one sigmoid output per label. ``predict_proba`` gives
    the class probabilities in the order of ``classes_``. See the module documentation.
    """

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y), continuing from the current weights and optimizer state.

        ``classes`` (every class the data will ever have) is needed on the first call. The
        current ``activation``, ``dropout`` and ``precision`` apply, as for a warm ``fit``; a call
        that raises leaves the estimator as it was.
        """
        if classes is None and not hasattr(self, "classes_"):
            raise ValueError("classes: the first call to partial_fit needs every class, classes=np.unique(y_all)")
        return self._fit(X, y, sample_weight, incremental=True, classes=classes)

    def _targets(self, y, first: bool, classes=None) -> tuple[np.ndarray, int, LabelBinarizer]:
        """(what the loss trains on, the number of outputs, the LabelBinarizer of the classes):
        class indices for a softmax, 0/1 columns for sigmoids. A fit from scratch (``first``)
        learns the classes from y, partial_fit's first call from ``classes``; later calls check
        y, and ``classes`` where given, against the fitted ones. Sets nothing."""
        check_classification_targets(y)
        if first:
            multilabel = type_of_target(y).startswith("multilabel")
            labels = LabelBinarizer().fit(y if classes is None or multilabel else classes)
        else:
            labels = self._label_binarizer
            if classes is not None and not np.array_equal(unique_labels(classes), labels.classes_):
                raise ValueError(f"classes: {unique_labels(classes)} differs from the first call's {labels.classes_}")
        found = unique_labels(y)
        if self.warm_start and set(found) != set(labels.classes_):
            raise ValueError(f"y: warm_start=True continues training on the classes {labels.classes_}, but y has "
                             f"{found}")
        if np.setdiff1d(found, labels.classes_).size:
            raise ValueError(f"y: classes {np.setdiff1d(found, labels.classes_)} are not among classes_ "
                             f"{labels.classes_}")
        encoded = labels.transform(y)
        if labels.y_type_ == "multiclass":
            return encoded.argmax(axis=1), encoded.shape[1], labels
        return encoded, encoded.shape[1], labels

    def _head(self, labels: LabelBinarizer | None = None) -> str:
        """The output layer's activation for the classes of ``labels`` (by default the fitted ones)."""
        labels = self._label_binarizer if labels is None else labels
        return "softmax" if labels.y_type_ == "multiclass" else "sigmoid"

    def _score_arrays(self, X, y, sample_weight) -> float:
        return accuracy_score(y, self._labels(self._predict_arrays(X)), sample_weight=sample_weight)

    def _labels(self, scores: np.ndarray) -> np.ndarray:
        return self._label_binarizer.inverse_transform(scores.ravel() if self.n_outputs_ == 1 else scores)

    def predict(self, X) -> np.ndarray:
        """The predicted class of each row of ``X`` (or a 0/1 row per sample for multi-label targets)."""
        return self._labels(self._outputs(X))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n_samples, n_classes) in the order of ``classes_``."""
        scores = self._outputs(X)
        if self.n_outputs_ == 1:
            return np.hstack([1 - scores, scores])
        return scores

    def _onnx_output(self) -> str | None:
        # One sigmoid output for two classes: predict_proba puts 1 - p, the first class's, before it.
        check_is_fitted(self)
        return "both_classes" if self.n_outputs_ == 1 else None

    def predict_log_proba(self, X) -> np.ndarray:
        """The logarithm of ``predict_proba``: -inf where a probability is 0."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multilayer perceptron regressor: scikit-learn's ``MLPRegressor`` on gpubp's kernels.

    A linear output layer with one output per target column; ``loss`` is "squared_error", or
    "poisson" for counts (y >= 0): the layer gives the log of the mean, and ``predict`` the
    mean (``exp`` of it), as scikit-learn's. See the module documentation.
    """

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9,
                 beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, device="auto", backend="auto", precision="fp32",
                 dropout=0.0):
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver, alpha=alpha,
            batch_size=batch_size, learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            power_t=power_t, max_iter=max_iter, shuffle=shuffle, random_state=random_state, tol=tol, verbose=verbose,
            warm_start=warm_start, momentum=momentum, nesterovs_momentum=nesterovs_momentum,
            early_stopping=early_stopping, validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, n_iter_no_change=n_iter_no_change, device=device, backend=backend, precision=precision,
            dropout=dropout)
        self.loss = loss

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), continuing from the current weights and optimizer state.

        The current ``activation``, ``dropout`` and ``precision`` apply, as for a warm ``fit``; a
        call that raises leaves the estimator as it was.
        """
        return self._fit(X, y, sample_weight, incremental=True)

    def _check_params(self) -> list[int]:
        _choice(self.loss, REGRESSION_LOSSES, "loss")
        return super()._check_params()

    def _check_warm(self, hidden: list[int]) -> None:
        """Also ``loss``: the fitted output layer gives the mean (``"squared_error"``) or its log
        (``"poisson"``), which the other loss would train and ``predict`` read as the wrong one."""
        super()._check_warm(hidden)
        if OUT_ACTIVATIONS[self._head()] != self.out_activation_:
            fitted = {"identity": "squared_error", "exp": "poisson"}[self.out_activation_]
            means = {"squared_error": "the mean", "poisson": "the log of the mean"}
            raise ValueError(f"loss: {self.loss!r}, but the model was fitted with loss={fitted!r}, so its output is "
                             f"{means[fitted]}, which {self.loss!r} would take for {means[self.loss]}; a warm fit "
                             "or partial_fit trains the fitted model on: fit with warm_start=False for a new model")

    def _targets(self, y, first: bool, classes=None) -> tuple[np.ndarray, int, None]:
        """(y, the number of outputs, None: no classes), y checked against ``loss``."""
        if self.loss == "poisson" and y.min() < 0:
            raise ValueError(f"y: loss='poisson' needs targets >= 0 (counts or rates), got values from {y.min()} "
                             f"to {y.max()}")
        return y, 1 if y.ndim == 1 else y.shape[1], None

    def _head(self, labels=None) -> str:
        return "exp" if self.loss == "poisson" else "identity"

    def _constant_loss(self, targets, weights) -> float:
        if self._head() != "exp":
            return 0.0
        targets = targets.reshape(len(targets), -1).astype(np.float64)
        per_sample = (xlogy(targets, targets) - targets).sum(axis=1)
        return float(np.average(per_sample, weights=weights))

    def _predict_arrays(self, X) -> np.ndarray:
        outputs = super()._predict_arrays(X)
        return np.exp(outputs) if self.out_activation_ == "exp" else outputs

    def _onnx_output(self) -> str | None:
        check_is_fitted(self)
        return "exp" if self.out_activation_ == "exp" else None  # predict's mean, exp of the model's log mean

    def _score_arrays(self, X, y, sample_weight) -> float:
        predicted = self._values(self._predict_arrays(X))
        return _r2_or_nan(y, predicted, sample_weight)

    def score(self, X, y, sample_weight=None) -> float:
        """R^2 of ``predict(X)`` against ``y``, as scikit-learn's regressors score; NaN where a
        prediction is inf or NaN (an ``exp`` that overflows, say), as scikit-learn's MLPs score an
        early-stopping epoch (its ``score`` raises there, in r2_score)."""
        return _r2_or_nan(y, self.predict(X), sample_weight)

    @staticmethod
    def _values(outputs: np.ndarray) -> np.ndarray:
        return outputs.ravel() if outputs.shape[1] == 1 else outputs

    def predict(self, X) -> np.ndarray:
        """Predicted targets: (n_samples,) for one target, else (n_samples, n_outputs_)."""
        return self._values(self._outputs(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        # loss="poisson" refuses y < 0 (_targets): the tag tells scikit-learn's checks and other tools so.
        tags.target_tags.positive_only = self.loss == "poisson"
        return tags


class _Epochs(gb.Callback):
    """Runs the estimator's end-of-epoch records inside ``Sequential.fit`` and stops it when they
    say so; before each batch, sets the weights' decay to ``decay`` (alpha's, per sample) over the
    batch's size. ``Sequential.fit`` draws the epoch's shuffle order after ``on_epoch_begin`` and
    the batch's Dropout keys after ``on_train_batch_begin``, both from the library's stream: these
    make it ``shuffles`` and ``masks`` in turn (the same generator, on a fit that builds the model)."""

    def __init__(self, estimator: _BaseMLP, n_samples: int, batch_size: int, decay: float, penalty_share: float,
                 validation, shuffles: np.random.Generator, masks: np.random.Generator) -> None:
        self.estimator, self.n_samples, self.batch_size, self.decay = estimator, n_samples, batch_size, decay
        self.penalty_share, self.validation = penalty_share, validation
        self.shuffles, self.masks = shuffles, masks
        self.squares = 0.0
        self.stopped = False

    def on_epoch_begin(self, model, epoch: int) -> None:
        _random.set_generator(self.shuffles)  # the estimator's _fit gives the library's own back
        self.squares = self.estimator._squared_weights()

    def on_train_batch_begin(self, model, batch: int) -> None:
        _random.set_generator(self.masks)
        size = min(self.batch_size, self.n_samples - batch * self.batch_size)
        self.estimator._optimizer.param_groups[0]["weight_decay"] = self.decay / size

    def on_epoch_end(self, model, epoch: int, logs: dict) -> None:
        if self.estimator._end_epoch(logs["loss"], self.squares, self.n_samples, self.penalty_share, self.validation):
            self.stopped = model.stop_training = True


def _r2_or_nan(y, predicted: np.ndarray, sample_weight) -> float:
    """R^2 of ``predicted`` against ``y``, or NaN if a prediction is not finite, where r2_score
    raises; an early-stopping epoch that scores NaN counts as one without improvement."""
    if not np.isfinite(predicted).all():
        return np.nan
    return r2_score(y, predicted, sample_weight=sample_weight)


def _choice(value, options: tuple, name: str) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def _sample_weights(sample_weight, n_samples: int) -> np.ndarray | None:
    """``sample_weight`` as finite float64 weights >= 0 of shape (n_samples,) (a number: that
    weight for every sample), or None."""
    if sample_weight is None:
        return None
    weights = np.asarray(sample_weight, dtype=np.float64)
    if weights.ndim == 0:
        weights = np.full(n_samples, float(weights))
    if weights.shape != (n_samples,):
        raise ValueError(f"sample_weight: expected shape ({n_samples},), one weight per sample, got {weights.shape}")
    if not np.all(np.isfinite(weights)) or weights.min() < 0:
        raise ValueError(f"sample_weight: expected finite weights >= 0, got values from {weights.min()} to "
                         f"{weights.max()}")
    return weights
