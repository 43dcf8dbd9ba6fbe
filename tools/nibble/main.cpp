// placeholder until the analyze command lands
int main() { return 0; }
