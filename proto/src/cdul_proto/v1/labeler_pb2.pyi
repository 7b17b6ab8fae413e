from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GlobalView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GLOBAL_VIEW_UNSPECIFIED: _ClassVar[GlobalView]
    GLOBAL_VIEW_CENTER_CROP: _ClassVar[GlobalView]
    GLOBAL_VIEW_SQUASH: _ClassVar[GlobalView]
    GLOBAL_VIEW_PAD: _ClassVar[GlobalView]
GLOBAL_VIEW_UNSPECIFIED: GlobalView
GLOBAL_VIEW_CENTER_CROP: GlobalView
GLOBAL_VIEW_SQUASH: GlobalView
GLOBAL_VIEW_PAD: GlobalView

class Image(_message.Message):
    __slots__ = ("id", "data", "content_key", "uri")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    content_key: str
    uri: str
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ..., content_key: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class Vocabulary(_message.Message):
    __slots__ = ("class_names", "templates")
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    templates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, class_names: _Optional[_Iterable[str]] = ..., templates: _Optional[_Iterable[str]] = ...) -> None: ...

class PseudoLabelOptions(_message.Message):
    __slots__ = ("grid_size", "threshold", "lambda_weight", "temperature", "global_view", "return_tile_scores", "return_embeddings")
    GRID_SIZE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VIEW_FIELD_NUMBER: _ClassVar[int]
    RETURN_TILE_SCORES_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    grid_size: int
    threshold: float
    lambda_weight: float
    temperature: float
    global_view: GlobalView
    return_tile_scores: bool
    return_embeddings: bool
    def __init__(self, grid_size: _Optional[int] = ..., threshold: _Optional[float] = ..., lambda_weight: _Optional[float] = ..., temperature: _Optional[float] = ..., global_view: _Optional[_Union[GlobalView, str]] = ..., return_tile_scores: _Optional[bool] = ..., return_embeddings: _Optional[bool] = ...) -> None: ...

class PseudoLabelRequest(_message.Message):
    __slots__ = ("model", "images", "vocabulary", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    vocabulary: Vocabulary
    options: PseudoLabelOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., vocabulary: _Optional[_Union[Vocabulary, _Mapping]] = ..., options: _Optional[_Union[PseudoLabelOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ImageStatus(_message.Message):
    __slots__ = ("code", "message", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FloatMatrix(_message.Message):
    __slots__ = ("rows", "cols", "values")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class PseudoLabelResult(_message.Message):
    __slots__ = ("id", "content_key", "status", "global_scores", "aggregate_scores", "final_scores", "tile_scores", "embedding", "tile_embeddings", "cache_hit", "width", "height")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SCORES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_SCORES_FIELD_NUMBER: _ClassVar[int]
    FINAL_SCORES_FIELD_NUMBER: _ClassVar[int]
    TILE_SCORES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    TILE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    content_key: str
    status: ImageStatus
    global_scores: _containers.RepeatedScalarFieldContainer[float]
    aggregate_scores: _containers.RepeatedScalarFieldContainer[float]
    final_scores: _containers.RepeatedScalarFieldContainer[float]
    tile_scores: FloatMatrix
    embedding: _containers.RepeatedScalarFieldContainer[float]
    tile_embeddings: FloatMatrix
    cache_hit: bool
    width: int
    height: int
    def __init__(self, id: _Optional[str] = ..., content_key: _Optional[str] = ..., status: _Optional[_Union[ImageStatus, _Mapping]] = ..., global_scores: _Optional[_Iterable[float]] = ..., aggregate_scores: _Optional[_Iterable[float]] = ..., final_scores: _Optional[_Iterable[float]] = ..., tile_scores: _Optional[_Union[FloatMatrix, _Mapping]] = ..., embedding: _Optional[_Iterable[float]] = ..., tile_embeddings: _Optional[_Union[FloatMatrix, _Mapping]] = ..., cache_hit: _Optional[bool] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class PseudoLabelResponse(_message.Message):
    __slots__ = ("model", "class_names", "results", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    results: _containers.RepeatedCompositeFieldContainer[PseudoLabelResult]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., results: _Optional[_Iterable[_Union[PseudoLabelResult, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PredictOptions(_message.Message):
    __slots__ = ("top_k", "threshold")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    threshold: float
    def __init__(self, top_k: _Optional[int] = ..., threshold: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "images", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    options: PredictOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[PredictOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("name", "index", "score")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    score: float
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class PredictResult(_message.Message):
    __slots__ = ("id", "content_key", "status", "scores", "labels")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    content_key: str
    status: ImageStatus
    scores: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, id: _Optional[str] = ..., content_key: _Optional[str] = ..., status: _Optional[_Union[ImageStatus, _Mapping]] = ..., scores: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "class_names", "results", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    results: _containers.RepeatedCompositeFieldContainer[PredictResult]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., results: _Optional[_Iterable[_Union[PredictResult, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SearchCropsRequest(_message.Message):
    __slots__ = ("model", "text", "k", "include_whole_images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WHOLE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    k: int
    include_whole_images: bool
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., k: _Optional[int] = ..., include_whole_images: _Optional[bool] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class CropHit(_message.Message):
    __slots__ = ("content_key", "image_id", "tile_index", "grid_size", "row", "col", "box", "score")
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TILE_INDEX_FIELD_NUMBER: _ClassVar[int]
    GRID_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    content_key: str
    image_id: str
    tile_index: int
    grid_size: int
    row: int
    col: int
    box: Box
    score: float
    def __init__(self, content_key: _Optional[str] = ..., image_id: _Optional[str] = ..., tile_index: _Optional[int] = ..., grid_size: _Optional[int] = ..., row: _Optional[int] = ..., col: _Optional[int] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ...) -> None: ...

class SearchCropsResponse(_message.Message):
    __slots__ = ("model", "hits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    model: str
    hits: _containers.RepeatedCompositeFieldContainer[CropHit]
    def __init__(self, model: _Optional[str] = ..., hits: _Optional[_Iterable[_Union[CropHit, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Preprocess(_message.Message):
    __slots__ = ("size", "mean", "std", "interpolation", "resize_mode")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    size: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    interpolation: str
    resize_mode: str
    def __init__(self, size: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., interpolation: _Optional[str] = ..., resize_mode: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "embedding_dim", "logit_scale", "class_names", "preprocess", "weights", "is_default", "precision", "default_templates")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    embedding_dim: int
    logit_scale: float
    class_names: _containers.RepeatedScalarFieldContainer[str]
    preprocess: Preprocess
    weights: str
    is_default: bool
    precision: str
    default_templates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., logit_scale: _Optional[float] = ..., class_names: _Optional[_Iterable[str]] = ..., preprocess: _Optional[_Union[Preprocess, _Mapping]] = ..., weights: _Optional[str] = ..., is_default: _Optional[bool] = ..., precision: _Optional[str] = ..., default_templates: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
