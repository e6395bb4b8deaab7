// llama_logits MODEL.gguf LORA.gguf|- OUT.f32 ID [ID ...]: llama.cpp's logits at every position, float32 (T, V).
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <string>

int main(int argc, char ** argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s MODEL LORA|- OUT ID...\n", argv[0]); return 2; }
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.use_extra_bufts = false;  // the AMX repack kernel crashes in this VM
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load model\n"); return 1; }
    std::vector<llama_token> ids;
    for (int i = 4; i < argc; i++) ids.push_back(atoi(argv[i]));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = ids.size() + 8; cp.n_batch = ids.size(); cp.n_ubatch = ids.size();
    cp.n_threads = 2; cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32;  // an F16 KV cache would round K and V
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot make context\n"); return 1; }
    std::string lora = argv[2];
    if (lora != "-") {
        llama_adapter_lora * ad = llama_adapter_lora_init(model, argv[2]);
        if (!ad) { fprintf(stderr, "cannot load lora\n"); return 1; }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &ad, 1, &scale) != 0) { fprintf(stderr, "cannot set lora\n"); return 1; }
    }
    llama_batch batch = llama_batch_init(ids.size(), 0, 1);
    for (size_t i = 0; i < ids.size(); i++) {
        batch.token[i] = ids[i]; batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = 1;
    }
    batch.n_tokens = ids.size();
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * f = fopen(argv[3], "wb");
    for (size_t i = 0; i < ids.size(); i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    fclose(f);
    fprintf(stderr, "wrote %zu x %d logits\n", ids.size(), n_vocab);
    llama_batch_free(batch); llama_free(ctx); llama_model_free(model);
    return 0;
}
