"""The OpenAPI 3.1 description of ``charlstm serve`` (served at ``/openapi.json``)."""

from __future__ import annotations

_ERROR = {"description": "an error in OpenAI's shape", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}


def _json(ref: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


_STRINGS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "charlstm serve", "version": "1",
             "description": "Character-level LSTM models in the OpenAI completions dialect. One character is "
                            "one token: max_tokens, usage and logprobs count characters."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "required on /v1/ routes when the server has --api-key"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                 "param": {"type": ["string", "null"]},
                                                 "code": {"type": ["string", "null"]}}}}},
            "CompletionRequest": {
                "type": "object", "required": ["prompt"], "additionalProperties": False,
                "properties": {
                    "model": {"type": "string", "description": "a name from /v1/models (optional with one model)"},
                    "prompt": _STRINGS,
                    "max_tokens": {"type": "integer", "minimum": 0,
                                   "description": "characters to generate; default and ceiling: --max-length"},
                    "temperature": {"type": "number", "minimum": 0, "maximum": 100, "default": 1,
                                    "description": "0 = greedy; otherwise at least 0.01"},
                    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
                    "top_k": {"type": "integer", "minimum": -1, "default": 0, "description": "0 or -1: off"},
                    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                       {"type": "null"}], "description": "at most --max-stop strings"},
                    "n": {"type": "integer", "minimum": 1, "default": 1,
                          "description": "choices per prompt; n x prompts at most --max-choices"},
                    "seed": {"type": "integer", "description": "choice i uses seed + i; the same seed gives the "
                                                               "same text alone or in any batch"},
                    "stream": {"type": "boolean", "default": False},
                    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
                    "logprobs": {"type": ["integer", "null"], "minimum": 0,
                                 "description": "alternatives per character (at most --max-logprobs), under the "
                                                "model's own distribution (temperature 1)"},
                    "echo": {"type": "boolean", "default": False,
                             "description": "output the prompt first, as the model read it"},
                    "prime_unknown": {"enum": ["error", "skip"], "default": "error",
                                      "description": "characters the model does not know: refuse, or drop them"},
                    "user": {"type": "string"},
                    "presence_penalty": {"const": 0}, "frequency_penalty": {"const": 0},
                    "best_of": {"type": "integer"}, "logit_bias": {"type": "object", "maxProperties": 0},
                    "suffix": {"type": ["string", "null"], "maxLength": 0},
                }},
            "Logprobs": {"type": ["object", "null"], "properties": {
                "tokens": {"type": "array", "items": {"type": "string"}},
                "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
                "top_logprobs": {"type": "array", "items": {"type": ["object", "null"],
                                                            "additionalProperties": {"type": "number"}}},
                "text_offset": {"type": "array", "items": {"type": "integer"}}}},
            "Choice": {"type": "object", "properties": {
                "text": {"type": "string"}, "index": {"type": "integer"},
                "logprobs": {"$ref": "#/components/schemas/Logprobs"},
                "finish_reason": {"enum": ["stop", "length", "abort", "error", None],
                                  "description": "stop: a stop string; length: max_tokens; abort: the time limit "
                                                 "or shutdown"}}},
            "Completion": {"type": "object", "properties": {
                "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
                "model": {"type": "string"}, "seed": {"type": "integer"},
                "choices": {"type": "array", "items": {"$ref": "#/components/schemas/Choice"}},
                "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                           "completion_tokens": {"type": "integer"},
                                                           "total_tokens": {"type": "integer"}}}}},
            "ScoreRequest": {"type": "object", "required": ["text"], "additionalProperties": False, "properties": {
                "model": {"type": "string"}, "text": {"type": "string", "description": "at most --max-score-chars"},
                "prime_unknown": {"enum": ["error", "skip"]}, "top": {"type": "integer", "minimum": 0, "default": 5},
                "user": {"type": "string"}}},
            "Score": {"type": "object", "properties": {
                "object": {"const": "text_score"}, "model": {"type": "string"}, "text": {"type": "string"},
                "chars": {"type": "array", "items": {"type": "string"}},
                "probs": {"type": "array", "items": {"type": ["number", "null"]}},
                "bits": {"type": "array", "items": {"type": ["number", "null"]},
                         "description": "surprise -log2 p per character (null for the first)"},
                "top": {"type": "array", "items": {"type": "array"}},
                "bits_per_char": {"type": "number"}, "scored_characters": {"type": "integer"},
                "compressors": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "bits_per_char": {"type": "number"}}}}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/completions": {"post": {
            "summary": "Generate text after a prompt (stream: true for Server-Sent Events ending in [DONE])",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/CompletionRequest"}}}},
            "responses": {"200": {"description": "the completion, or text/event-stream chunks of it",
                                  "content": {"application/json": {"schema": {
                                      "$ref": "#/components/schemas/Completion"}},
                                      "text/event-stream": {"schema": {"type": "string"}}}},
                          "400": _ERROR, "401": _ERROR, "404": _ERROR, "413": _ERROR,
                          "429": _ERROR, "503": _ERROR}}},
        "/v1/score": {"post": {
            "summary": "Each character's probability and surprise under the model",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/ScoreRequest"}}}},
            "responses": {"200": _json("Score", "per-character scores"), "400": _ERROR, "401": _ERROR,
                          "404": _ERROR, "413": _ERROR, "503": _ERROR}}},
        "/v1/models": {"get": {"summary": "The models served, with config, vocabulary, parameters and "
                                          "validation bits/char",
                               "responses": {"200": {"description": "an OpenAI model list"}, "401": _ERROR}}},
        "/v1/models/{name}": {"get": {"summary": "One model", "parameters": [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the model"}, "404": _ERROR}}},
        "/health": {"get": {"summary": "ok (200) or loading (503), with the active and waiting stream counts",
                            "security": [], "responses": {"200": {"description": "serving"},
                                                          "503": {"description": "loading"}}}},
        "/": {"get": {"summary": "The page", "security": [], "responses": {"200": {"description": "HTML"}}}},
    },
}
